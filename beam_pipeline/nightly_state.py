"""The state a nightly dedup keeps between runs (local or gs://), committed one generation at a time.

    STATE/
      CURRENT                    the committed generation's directory name (one small object: the commit)
      LOCK                       while a run holds the state: who, since when (JSON)
      generations/<name>/        one per run: state.json, items.parquet, templates/, failures/, matches/,
                                 clusters/ (every item of the catalogue as of that run)
      runs/<run_date>/           what that date's run wrote: manifest.json, clusters/, the day's new matches

A run writes its generation under a fresh name and commits by rewriting CURRENT last, so a run killed at
any point leaves CURRENT on the last good generation; the next run ignores (and removes) generations
nobody points at. state.json links each generation to its parent, so re-running a date starts again from
the state before it. The lock is an object created only if absent (os.O_EXCL locally; a GCS precondition
`if_generation_match=0` on gs://), so two runs started at once cannot both hold it.
"""
from __future__ import annotations

import datetime
import json
import os
import socket

from apache_beam.io.filesystems import FileSystems

from beam_pipeline import io as bio
from beam_pipeline import outputs

CURRENT = "CURRENT"
LOCK = "LOCK"
GENERATIONS = "generations"
RUNS = "runs"
STATE_DOC = "state.json"
ITEMS = "items.parquet"


class StateLocked(ValueError):
    """Another run holds the state's lock (a ValueError: the command line says it in one line, status 2)."""


def _join(*parts: str) -> str:
    return FileSystems.join(*parts)


def generation_dir(state: str, name: str) -> str:
    return _join(state, GENERATIONS, name)


def run_dir(state: str, run_date: str) -> str:
    return _join(state, RUNS, run_date)


def current_name(state: str) -> str | None:
    """The committed generation's name, or None for a state no run has committed yet."""
    path = _join(state, CURRENT)
    if not FileSystems.exists(path):
        return None
    return bio.read_text(path).strip() or None


def read_generation(state: str, name: str) -> dict:
    """state.json of generation `name` (with its "dir")."""
    doc = bio.read_json(_join(generation_dir(state, name), STATE_DOC))
    return {**doc, "dir": generation_dir(state, name)}


def current(state: str) -> dict | None:
    """state.json of the committed generation, or None."""
    name = current_name(state)
    return None if name is None else read_generation(state, name)


def current_templates_glob(state: str) -> str | None:
    """The committed generation's templates (what a streaming matcher indexes), or None."""
    name = current_name(state)
    return None if name is None else bio.table_glob(generation_dir(state, name), "templates")


def commit(state: str, name: str) -> None:
    """Point CURRENT at generation `name`: the one write that makes a run's results the state. Locally an
    atomic rename of a written file; on object stores a single object write (atomic there)."""
    path = _join(state, CURRENT)
    if bio._is_local(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        bio.write_text(path, name + "\n")


def live_generations(state: str, keep: int = 2) -> set[str]:
    """CURRENT and its ancestors, `keep` in all (a re-run of the last date starts from the parent)."""
    live, name = set(), current_name(state)
    while name is not None and len(live) < keep:
        live.add(name)
        name = read_generation(state, name).get("parent")
    return live


def remove_dead_generations(state: str, keep: int = 2) -> list[str]:
    """Delete generations no run points at (left by killed runs, or older than `keep`); their names."""
    root = _join(state, GENERATIONS)
    live = live_generations(state, keep)
    names = set()
    for m in FileSystems.match([_join(root, "*", STATE_DOC)])[0].metadata_list if FileSystems.exists(root) else []:
        names.add(m.path.rstrip("/").split("/")[-2])
    if bio._is_local(root) and os.path.isdir(root):
        names |= set(os.listdir(root))  # a killed run may have died before writing its state.json
    dead = sorted(names - live)
    for name in dead:
        outputs.delete_path(generation_dir(state, name))
    return dead


# ----------------------------------------------------------------------------------------------- lock

def _lock_doc(run_id: str) -> str:
    return json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})


def acquire_lock(state: str, run_id: str) -> None:
    """Create STATE/LOCK, or raise StateLocked naming who holds it (a run started at the same time, or one
    that was killed: then remove it with --break_lock once sure it is not running)."""
    path = _join(state, LOCK)
    doc = _lock_doc(run_id)
    try:
        if bio._is_local(path):
            os.makedirs(state, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(doc)
            return
        if FileSystems.exists(path):  # the common case, said plainly; the precondition closes the race
            raise _PreconditionFailed(path)
        _gcs_create_only(path, doc)
        if json.loads(bio.read_text(path)).get("run_id") != run_id:  # a store that ignored the precondition
            raise _PreconditionFailed(path)
    except (FileExistsError, _PreconditionFailed):
        try:
            holder = bio.read_text(path).strip()
        except Exception:  # noqa: BLE001 - released meanwhile: say so rather than guess
            holder = "(released while we looked)"
        raise StateLocked(f"the state {state} is locked by another nightly run: {holder}. If that run is no longer "
                          "running (killed), pass --break_lock") from None


def release_lock(state: str, run_id: str | None = None) -> None:
    """Remove STATE/LOCK (only ours when run_id is given)."""
    path = _join(state, LOCK)
    if not FileSystems.exists(path):
        return
    if run_id is not None:
        try:
            if json.loads(bio.read_text(path)).get("run_id") != run_id:
                return
        except ValueError:
            pass
    FileSystems.delete([path])


class _PreconditionFailed(Exception):
    pass


def _gcs_create_only(path: str, text: str) -> None:
    """Write gs://bucket/name only if no object of that name exists (generation precondition 0)."""
    from google.api_core import exceptions
    from google.cloud import storage

    bucket, _, name = path[len("gs://"):].partition("/")
    blob = storage.Client().bucket(bucket).blob(name)
    try:
        blob.upload_from_string(text, content_type="application/json", if_generation_match=0)
    except exceptions.PreconditionFailed:
        raise _PreconditionFailed(path) from None
