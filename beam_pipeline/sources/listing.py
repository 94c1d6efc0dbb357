"""A catalogue's listing: every entry its glob matches, each a file to read or a reason it cannot be one.

Local globs are walked here (`local_listing`): Beam's local match drops dangling links and link loops
without a word, which would lose items. gs:// and other filesystems are listed by Beam's match.
"""
from __future__ import annotations

import errno
import fnmatch
import functools
import glob as glob_module
import os
import re
import stat
from typing import Iterator, NamedTuple, Optional

from apache_beam.io.filesystems import FileSystems

from beam_pipeline import io as bio
from beam_pipeline.sources.record import describe


class Listed(NamedTuple):
    """One entry of a catalogue's listing: a file to read (size in bytes, -1 unknown), or an entry that
    cannot be an item, with why (`problem`): it becomes a failures row, never a silent gap."""

    path: str
    size: int
    problem: Optional[str] = None
    modified: Optional[float] = None  # last modification, seconds since the epoch, when the filesystem says


_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _glob_parts(base: str, parts: list[str], seen: set) -> Iterator[tuple[str, Optional[str]]]:
    """(path, problem) of the local entries under `base` matching glob `parts` (see `local_listing`)."""
    if not parts:
        if base not in seen:
            seen.add(base)
            yield base, None
        return
    part, rest = parts[0], parts[1:]
    if part == "**":  # any depth, none included; as the last part: every file below
        if rest:
            yield from _glob_parts(base, rest, seen)
        for entry in _scan(base):
            if entry.name.startswith("."):
                continue
            path = os.path.join(base, entry.name)
            if entry.is_dir(follow_symlinks=False):
                yield from _glob_parts(path, parts, seen)
            elif entry.is_symlink() and os.path.isdir(path):
                yield path, ("a symbolic link to a directory, not followed under '**' (a link can loop); "
                             "its files are not listed: give a glob of its target")
            elif not rest:
                yield from _glob_parts(path, rest, seen)
        return
    if not glob_module.has_magic(part):
        path = os.path.join(base, part)
        if rest:
            if os.path.isdir(path):
                yield from _glob_parts(path, rest, seen)
        elif os.path.lexists(path):
            yield from _glob_parts(path, rest, seen)
        return
    matches = _name_pattern(part)
    hidden_too = part.startswith(".")
    head = os.path.join(base, "")
    for entry in _scan(base):
        name = entry.name
        if name.startswith(".") and not hidden_too:
            continue  # hidden entries, as glob skips them
        if not matches(name):
            continue
        path = head + name
        if rest:
            if entry.is_dir():
                yield from _glob_parts(path, rest, seen)
        elif path not in seen:  # the last part (most entries of a big catalogue): no recursion
            seen.add(path)
            yield path, None


@functools.lru_cache(maxsize=256)
def _name_pattern(part: str):
    """fnmatch.fnmatchcase(name, part) as one compiled regular expression's match."""
    return re.compile(fnmatch.translate(part)).match


def _scan(directory: str) -> list:
    try:
        with os.scandir(directory or ".") as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def _classify(path: str) -> Optional[Listed]:
    """The Listed entry of local `path`, or None for a directory (not an item)."""
    try:
        info = os.stat(path)  # follows links
    except OSError as err:
        if err.errno == errno.ELOOP:
            return Listed(path, -1, "a symbolic link loop (the link points back at itself)")
        if os.path.islink(path):
            return Listed(path, -1, f"a dangling symbolic link (to {os.readlink(path)!r}, which does not exist)")
        return Listed(path, -1, describe(err))
    if not stat.S_ISREG(info.st_mode):  # the rare kinds, tested only off the common path
        if stat.S_ISDIR(info.st_mode):
            return None
        for is_kind, kind in _FILE_KINDS:
            if is_kind(info.st_mode):
                return Listed(path, -1, f"not a regular file: {kind}")
    return Listed(path, int(info.st_size), modified=info.st_mtime_ns / 1e9)


def local_listing(input_glob: str) -> Iterator[Listed]:
    """Every entry a local glob matches, each as a Listed: files with their size, and whatever cannot be
    read (dangling links, link loops, pipes, devices, links to directories under '**') with why.

    Glob syntax as Python's `glob` (hidden names need a leading '.' in the pattern), with '**' matching
    any depth including none ('cat/**/*.png' matches cat/a.png and cat/x/y/b.png), the same as a GCS
    glob's '**' up to that; '**' does not descend into symbolic links to directories. Beam's local match
    drops dangling links and loops without a word, which would lose items.
    """
    pattern = os.path.expanduser(input_glob)
    absolute = os.path.isabs(pattern)
    parts = [p for p in pattern.split(os.sep) if p]
    base = os.sep if absolute else ""
    # The directories before the first wildcard, joined once: each file would otherwise climb back up
    # through one generator per directory level (a catalogue has millions of files).
    while len(parts) > 1 and not glob_module.has_magic(parts[0]):
        base, parts = os.path.join(base, parts[0]), parts[1:]
    if base not in ("", os.sep) and not os.path.isdir(base):
        return
    for path, problem in _glob_parts(base, parts, set()):
        path = path if absolute or not path.startswith("./") else path[2:]
        if problem is not None:
            yield Listed(path, -1, problem)
            continue
        listed = _classify(path)
        if listed is not None:
            yield listed


def list_catalogue(input_glob: str, limit: Optional[int] = None) -> list[Listed]:
    """The listing of `input_glob` (local: `local_listing`; gs:// and other filesystems: Beam's match),
    in path order; at most `limit` entries (the first found) when given."""
    if bio._is_local(input_glob):
        found = []
        for listed in local_listing(input_glob):
            found.append(listed)
            if limit is not None and len(found) >= limit:
                break
        return sorted(found)
    result = FileSystems.match([input_glob], limits=None if limit is None else [limit])[0]
    return sorted(Listed(*path_and_size(m), modified=getattr(m, "last_updated_in_seconds", None) or None)
                  for m in result.metadata_list if not is_directory(m.path))


def path_and_size(metadata) -> tuple[str, int]:
    """FileMetadata -> (path, size in bytes or -1): plain values, which Beam encodes without pickling."""
    size = metadata.size_in_bytes
    return metadata.path, -1 if size is None else int(size)


def is_directory(path: str) -> bool:
    """Whether a matched path is a directory: GCS "folder" placeholder objects end in '/' (a local match
    lists files only)."""
    return path.endswith("/")
