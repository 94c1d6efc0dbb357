"""Tar shards (plain, .tar.gz / .tgz), WebDataset-style: one image member an item.

Members that share the image's key (its path up to the first '.' of the file name) carry metadata, e.g.
`000123.jpg` + `000123.cls` (the label, with `--label_key cls`). Members that are not images (by
extension) are metadata, not items. item_id = `<shard id>#<member name>`; source_uri =
`<shard path>#<member name>` (a name's repeats in one tar: `<name>@<n>`). A shard is read as one stream,
front to back: when it breaks, the images before the break are kept and the rest becomes one failure,
`<shard id>#rest@<images read>`.
"""
from __future__ import annotations

import posixpath
import tarfile
from typing import Iterator, Optional, Union

from beam_pipeline.sources.files import IMAGE_EXTENSIONS
from beam_pipeline.sources.record import ReadFailure, Record, RecordKeys, as_text, describe, open_stream, too_big

SUFFIXES = (".tar", ".tar.gz", ".tgz")


def webdataset_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a WebDataset member: 'a/000123.seg.png' -> ('a/000123', 'seg.png')."""
    directory, base = posixpath.split(member_name)
    stem, dot, extension = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, extension if dot else ""


def _is_image_member(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


class _TarInfo(tarfile.TarInfo):
    """TarInfo whose header errors after the first member propagate: `tarfile` in stream mode takes a
    cut, invalid or missing header for the end of the archive, so a cut shard would lose its tail
    silently. Only the end-of-archive marker (a zero block) ends it."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.EmptyHeaderError:
            raise tarfile.ReadError("the archive ends without its end-of-archive marker (cut short?)") from None
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as err:
            raise tarfile.ReadError(f"bad member header: {err}") from None


def tar_shard_records(path: str, shard_id: str, keys: RecordKeys = RecordKeys(),
                      max_bytes: int = 0) -> Iterator[Union[Record, ReadFailure]]:
    """Every image member of the tar shard at `path` as a Record / ReadFailure, in order.

    The stream is read once, front to back (a gs:// object is not downloaded whole). With
    `keys.label` = an extension (e.g. 'cls'), the member `<key>.<extension>` gives the label of the images
    with that key; WebDataset writes a sample's members together, so labels are matched within a run of
    members with the same key. A member over `max_bytes` is not read.
    """
    count = 0  # image members read
    pending: list[tuple[str, str, Optional[bytes], int]] = []  # images of the current key
    pending_key, label = None, None
    seen: dict[str, int] = {}  # member name -> repeats so far
    try:
        with open_stream(path) as f, tarfile.open(fileobj=f, mode="r|*", tarinfo=_TarInfo) as archive:
            for member in archive:
                if member.isdir():
                    continue
                if not member.isfile():  # links, devices, pipes: nothing to read; an image name is an item
                    if _is_image_member(member.name):
                        count += 1
                        seen[member.name] = seen.get(member.name, -1) + 1
                        uri = f"{path}#{member.name}" + (f"@{seen[member.name]}" if seen[member.name] else "")
                        pending.append((f"{shard_id}#{member.name}", uri, _tar_member_kind(member), member.size))
                    continue
                key, extension = webdataset_key(member.name)
                if key != pending_key:
                    yield from _tar_items(pending, label, max_bytes)
                    pending, pending_key, label = [], key, None
                if keys.label is not None and extension == keys.label:
                    label = as_text(archive.extractfile(member).read()).strip()
                    continue
                if not _is_image_member(member.name):
                    continue
                data = None
                if not (max_bytes and member.size > max_bytes):
                    data = archive.extractfile(member).read()
                count += 1
                # A name can repeat in a tar: the repeats keep the item id (refused later as a repeated
                # id) but get their own source_uri.
                seen[member.name] = seen.get(member.name, -1) + 1
                uri = f"{path}#{member.name}" + (f"@{seen[member.name]}" if seen[member.name] else "")
                pending.append((f"{shard_id}#{member.name}", uri, data, member.size))
    except Exception as err:  # tarfile.ReadError, gzip errors, a stream cut short
        yield from _tar_items(pending, label, max_bytes)
        if count:
            yield ReadFailure(f"{shard_id}#rest@{count}", f"{path}#rest@{count}",
                              f"{describe(err)}; the rest of the shard could not be read")
        else:
            yield ReadFailure(shard_id, path, describe(err))
        return
    yield from _tar_items(pending, label, max_bytes)


def _tar_member_kind(member: tarfile.TarInfo) -> str:
    """Why a tar member that is not a regular file cannot be an item."""
    if member.issym():
        return f"OSError: the tar member is a symbolic link (to {member.linkname!r}): links in shards are not followed"
    if member.islnk():
        return f"OSError: the tar member is a hard link (to {member.linkname!r}): links in shards are not followed"
    kinds = ((member.ischr, "a character device"), (member.isblk, "a block device"), (member.isfifo, "a FIFO"))
    kind = next((name for test, name in kinds if test()), f"of type {member.type!r}")
    return f"OSError: the tar member is {kind}, not a file"


def _tar_items(pending, label, max_bytes) -> Iterator[Union[Record, ReadFailure]]:
    """Records of the pending image members; `data` None: over the size limit; a str: why it is not a file."""
    for item_id, uri, data, size in pending:
        if data is None:
            yield ReadFailure(item_id, uri, too_big(size, max_bytes, "member"))
        elif isinstance(data, str):
            yield ReadFailure(item_id, uri, data)
        else:
            yield Record(item_id, uri, data, label)
