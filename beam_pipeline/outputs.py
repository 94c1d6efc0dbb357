"""Stage outputs that never lie: written aside, published on success, and tied to what made them.

Atomic runs. A stage writes everything into `OUTPUT/_staging/<stage>-<run_id>/` (`StagedRun`) and only
when it has finished and checked its outputs does it publish them into OUTPUT, replacing the previous
ones. A run that fails, is refused or is interrupted (Ctrl-C) deletes its staging directory and leaves the
last good outputs whole; the staging directory of a run killed outright is removed by the stage's next run.
A run killed outright while publishing (between two moves) is repaired by the next run of the stage.
Local directories are swapped by rename. On gs://, where there are no directories, the new objects are
copied over the old and the leftovers deleted; a reader that lands in that window sees a table directory
holding shards of two runs, which `table_lineage` refuses (a table directory holds one run's shards).

Lineage. Every table a stage writes carries a lineage document in its Parquet footer (schema metadata
under LINEAGE_KEY): the stage, its run id, the model, and what it was made from. The templates a stage
reads are identified by their content (`templates_fingerprint`: item ids, content hashes and model ids),
so re-embedding an unchanged catalogue keeps its matches valid while replacing one file does not. Each
stage refuses inputs that do not belong together (`check_matches`, `check_clusters`), naming both sides.

Stale outputs. When a stage publishes, outputs of later stages in the same OUTPUT that were made from what
it replaced are moved aside into `OUTPUT/stale/<stage>-<run_id>/`, never left to be mixed with the new.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import io as bio

log = logging.getLogger(__name__)

LINEAGE_KEY = b"siamese_dedup.lineage"
STAGING_DIR = "_staging"
STALE_DIR = "stale"
# What each stage publishes into OUTPUT (tables are directories, documents files), in pipeline order.
STAGE_OUTPUTS = {
    "embed": ("templates", "failures", "labels"),
    "match": ("matches", "verifications", "match_run.json"),
    "dedup": ("clusters",),
    "report": ("report.json", "report.html", "figures"),
}
STAGES = tuple(STAGE_OUTPUTS)
_SHARD_NAME = re.compile(r"-(\d{5})-of-(\d{5})\.parquet$")
# Columns that identify a templates table's content (the embedding follows from content and model).
FINGERPRINT_COLUMNS = ["item_id", "content_sha256", "model_id", "run_id"]


class LineageError(ValueError):
    """Inputs that do not belong together (stale, mixed or unattributed): a user-facing refusal."""


# ----------------------------------------------------------------------------------------------- lineage

def with_lineage(schema: pa.Schema, lineage: dict) -> pa.Schema:
    """`schema` carrying `lineage` (a JSON-able dict) as footer metadata of every shard written with it."""
    metadata = dict(schema.metadata or {})
    metadata[LINEAGE_KEY] = json.dumps(lineage, sort_keys=True, default=str).encode("utf-8")
    return schema.with_metadata(metadata)


def _read_schema(path: str) -> pa.Schema:
    if FileSystems.get_scheme(path) is None:
        return pq.read_schema(path)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return pq.read_schema(pa.BufferReader(f.read()))


def shard_lineage(path: str) -> Optional[dict]:
    """The lineage document in the footer of the Parquet file `path`, or None if it carries none."""
    try:
        metadata = _read_schema(path).metadata or {}
    except (pa.ArrowInvalid, OSError) as err:
        raise OSError(f"{path}: not a readable Parquet file: {err}") from err
    raw = metadata.get(LINEAGE_KEY)
    return None if raw is None else json.loads(raw.decode("utf-8"))


def table_lineage(glob: str, what: str) -> list[dict]:
    """The lineage documents of the shards matching `glob`, one per (directory, run), checked whole.

    Raises FileNotFoundError if nothing matches and LineageError when a directory holds shards of
    different runs or of another shard count than their names say (a mixed or half-published table),
    or shards with no lineage at all (written by hand or by an older version: their origin is unknown).
    """
    paths = bio.match_paths(glob)
    if not paths:
        raise FileNotFoundError(f"no {what} Parquet files match {glob!r}")
    by_dir: dict[str, list[tuple[str, Optional[dict]]]] = {}
    for path in paths:
        by_dir.setdefault(path.rsplit("/", 1)[0], []).append((path, shard_lineage(path)))
    documents = []
    for directory, shards in sorted(by_dir.items()):
        missing = [p for p, doc in shards if doc is None]
        if missing:
            raise LineageError(
                f"{missing[0]}: the {what} carry no lineage (written by hand or by an older version), so "
                "what they were made from is unknown; rerun the stage that writes them")
        runs = sorted({doc["run_id"] for _, doc in shards})
        if len(runs) > 1:
            raise LineageError(f"{directory}: the {what} shards come from {len(runs)} runs ({', '.join(runs)}): "
                               "a table directory holds one run (half-published, or shards copied in)")
        counts = {m.group(2) for m in (_SHARD_NAME.search(p) for p, _ in shards) if m}
        if len(counts) == 1 and int(next(iter(counts))) != len(shards):
            raise LineageError(f"{directory}: {len(shards)} {what} shards, their names say "
                               f"{int(next(iter(counts)))}: the table is incomplete")
        documents.append(shards[0][1])
    return documents


def templates_fingerprint(glob: str) -> dict:
    """What identifies the templates matching `glob`: {"fingerprint", "items", "model_ids", "runs"}.

    fingerprint: sha256 over the sorted (item_id, content_sha256, model_id) of every row, so it changes
    when an item is added, removed or its bytes change, or another model embedded it, and not when an
    unchanged catalogue is embedded again. Reads only those columns.
    """
    from beam_pipeline.blocks import iter_parquet_batches

    return table_fingerprint(batch for _, batch in iter_parquet_batches(glob, FINGERPRINT_COLUMNS, "templates"))


def table_fingerprint(parts) -> dict:
    """`templates_fingerprint` of templates in memory: an iterable of Tables or RecordBatches (their
    FINGERPRINT_COLUMNS are read; none may be null, as the templates schema says). The rows
    "item_id\tcontent_sha256\tmodel_id" sorted (byte order, which is code point order in UTF-8) and joined
    by newlines are hashed in Arrow, not as Python strings: a catalogue has millions."""
    tables = [(pa.Table.from_batches([p]) if isinstance(p, pa.RecordBatch) else p).select(FINGERPRINT_COLUMNS)
              for p in parts]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return {"fingerprint": hashlib.sha256(b"").hexdigest()[:32], "items": 0, "model_ids": [], "runs": []}
    table = pa.concat_tables(tables, promote_options="permissive")
    ids, contents, models, runs = (table.column(c).combine_chunks().cast(pa.string()) for c in FINGERPRINT_COLUMNS)
    rows = pc.binary_join_element_wise(ids, contents, models, "\t")
    rows = rows.take(pc.sort_indices(rows))
    one_list = pa.ListArray.from_arrays(pa.array([0, len(rows)], pa.int32()), rows)
    text = pc.binary_join(one_list, "\n")[0].as_buffer()
    return {"fingerprint": hashlib.sha256(text).hexdigest()[:32], "items": len(rows),
            "model_ids": sorted(pc.unique(models).to_pylist()), "runs": sorted(pc.unique(runs).to_pylist())}


def single_run(glob: str, what: str, stage: str) -> dict:
    """The one lineage document of the `what` table at `glob`, written by `stage`; LineageError if the
    glob spans several runs or the shards were written by another stage."""
    documents = table_lineage(glob, what)
    runs = sorted({d["run_id"] for d in documents})
    if len(runs) > 1:
        raise LineageError(f"the {what} matching {glob!r} come from {len(runs)} {stage} runs ({', '.join(runs)}); "
                           f"give one run's {what}")
    if documents[0].get("stage") != stage:
        raise LineageError(f"{glob!r}: these are not {what} written by {stage} "
                           f"(their lineage says stage {documents[0].get('stage')!r})")
    return documents[0]


def check_matches(matches: dict, templates: dict, matches_glob: str, templates_glob: str) -> None:
    """Refuse matches (their lineage) made from other templates than `templates` (templates_fingerprint)."""
    made_from = matches.get("templates", {})
    if made_from.get("fingerprint") != templates["fingerprint"]:
        raise LineageError(
            f"the matches {matches_glob!r} (match run {matches['run_id']}) were made from other templates "
            f"({made_from.get('items')} items, embed runs {', '.join(made_from.get('runs', []))}) than "
            f"{templates_glob!r} now hold ({templates['items']} items, embed runs {', '.join(templates['runs'])}): "
            "an item was added, removed or changed since; rerun match on these templates")


def check_clusters(clusters: dict, matches: dict, templates: dict, clusters_glob: str) -> None:
    """Refuse clusters (their lineage) made from other matches or templates than the given ones."""
    if clusters.get("matches", {}).get("run_id") != matches["run_id"]:
        raise LineageError(
            f"the clusters {clusters_glob!r} (dedup run {clusters['run_id']}) were made from match run "
            f"{clusters.get('matches', {}).get('run_id')}, the matches are of run {matches['run_id']}: rerun dedup")
    if clusters.get("templates", {}).get("fingerprint") != templates["fingerprint"]:
        raise LineageError(
            f"the clusters {clusters_glob!r} (dedup run {clusters['run_id']}) were made from other templates "
            "than those given: rerun match and dedup")


# ------------------------------------------------------------------------------------------ staged runs

def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def _exists(path: str) -> bool:
    return os.path.lexists(path) if _is_local(path) else bool(_remote_files(path))


def _remote_files(path: str) -> list[str]:
    """Every object named `path` or under `path/` (gs://: a directory is a name prefix); [] if none."""
    found: set[str] = set()
    for glob in (path, path.rstrip("/") + "/**"):
        try:
            found.update(bio.match_paths(glob))
        except BeamIOError as err:  # GCS answers NotFound for an empty prefix on some servers
            if "NotFound" not in str(err) and "404" not in str(err):
                raise
    return sorted(found)


def delete_path(path: str) -> None:
    """Delete file or directory `path` (local, or every object under it on gs://); nothing if absent."""
    if _is_local(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
        return
    files = _remote_files(path)
    if files:
        FileSystems.delete(files)


def _move(src: str, dst: str) -> None:
    """Move file or directory `src` to `dst`, where nothing is (publish moves what was there aside
    first). Local: one rename; gs://: copies the objects, then deletes the sources and any objects
    `dst` held beyond them."""
    if _is_local(src):
        os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
        os.replace(src, dst)
        return
    sources = _remote_files(src)
    old = set(_remote_files(dst))
    targets = [dst + s[len(src):] for s in sources]
    if sources:
        FileSystems.copy(sources, targets)
    leftovers = sorted(old - set(targets))
    if leftovers:
        FileSystems.delete(leftovers)
    if sources:
        FileSystems.delete(sources)


def _beam_temp_dirs(table_dir: str) -> list[str]:
    """Beam's file sink temporary directories left inside a staged table directory."""
    if _is_local(table_dir):
        if not os.path.isdir(table_dir):
            return []
        return [os.path.join(table_dir, n) for n in os.listdir(table_dir) if n.startswith("beam-temp-")]
    return sorted({p[: p.index("/", len(table_dir) + 1)] for p in _remote_files(table_dir)
                   if p[len(table_dir) + 1:].startswith("beam-temp-") and "/" in p[len(table_dir) + 1:]})


class StagedRun:
    """The staging area of one run of `stage` writing into `output_dir`; a context manager.

        with StagedRun(output, "embed", run_id) as staged:
            ... write tables under staged.dir (documents at staged.path(name)) ...
            staged.publish(downstream_of_templates(fingerprint))  # or publish(): later outputs all aside

    Leaving the block without `publish` (an error, a refusal, KeyboardInterrupt) deletes the staging
    directory and leaves OUTPUT as it was. Entering it removes the staging directories that earlier runs
    of the same stage left when they were killed outright, first putting back any output such a run had
    moved out of OUTPUT while publishing and not yet replaced.
    """

    def __init__(self, output_dir: str, stage: str, run_id: str):
        if stage not in STAGE_OUTPUTS:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.output_dir = output_dir
        self.stage = stage
        self.run_id = run_id
        self.root = FileSystems.join(output_dir, STAGING_DIR)
        self.dir = FileSystems.join(self.root, f"{stage}-{run_id}")
        self.published: list[str] = []
        self.moved_aside: list[str] = []

    def __enter__(self) -> "StagedRun":
        self._remove_debris()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        delete_path(self.dir)
        if _is_local(self.root):
            try:
                os.rmdir(self.root)  # only when empty: another stage may be running
            except OSError:
                pass
        if exc_type is not None:
            log.info("%s run %s did not finish: nothing published, %s left as it was", self.stage, self.run_id,
                     self.output_dir)

    def path(self, name: str) -> str:
        """Where output `name` (a table directory or a document) is staged."""
        return FileSystems.join(self.dir, name)

    def _remove_debris(self) -> None:
        prefix = f"{self.stage}-"
        if _is_local(self.root):
            names = os.listdir(self.root) if os.path.isdir(self.root) else []
            old = [os.path.join(self.root, n) for n in names if n.startswith(prefix)]
        else:
            old = sorted({p[: p.index("/", len(self.root) + 1)] for p in _remote_files(self.root)
                          if p[len(self.root) + 1:].startswith(prefix) and "/" in p[len(self.root) + 1:]})
        for d in old:
            self._restore_replaced(d)
            log.warning("removing %s, left by a %s run that was killed before it finished", d, self.stage)
            delete_path(d)

    def _restore_replaced(self, killed_dir: str) -> None:
        """Put back the outputs a run killed while publishing had moved out of OUTPUT and not yet
        replaced (its `_replaced/`), so a kill between two moves loses nothing."""
        for name in STAGE_OUTPUTS[self.stage]:
            replaced = FileSystems.join(killed_dir, "_replaced", name)
            final = FileSystems.join(self.output_dir, name)
            if _exists(replaced) and not _exists(final):
                log.warning("restoring %s from %s: a run was killed while publishing", final, replaced)
                _move(replaced, final)

    def publish(self, downstream_valid=None) -> list[str]:
        """Move every staged output of this stage into OUTPUT, replacing the previous ones; returns the
        published paths.

        First the outputs of later stages are moved aside into OUTPUT/stale/ unless
        `downstream_valid(stage, path)` says they still hold (e.g. matches made from templates with the
        same fingerprint as the new ones); None moves them all aside. The previous outputs go into the
        staging directory (deleted with it); if any move fails, the moves made are undone in reverse, so
        OUTPUT is either all new or all as it was.
        """
        done: list[tuple[str, str]] = []  # (from, to) of every move made, to undo on failure

        def move(src: str, dst: str) -> None:
            _move(src, dst)
            done.append((src, dst))

        try:
            for final, stage in self._downstream(downstream_valid):
                move(final, self._aside(final))
            for name in STAGE_OUTPUTS[self.stage]:
                staged, final = self.path(name), FileSystems.join(self.output_dir, name)
                if not _exists(staged):
                    if _exists(final):  # an output this run did not write would be mistaken for its own
                        move(final, self._aside(final))
                    continue
                for temp in _beam_temp_dirs(staged):
                    delete_path(temp)
                if _exists(final):
                    move(final, FileSystems.join(self.dir, "_replaced", name))
                move(staged, final)
        except BaseException:
            for src, dst in reversed(done):
                _move(dst, src)
            raise
        self.published = [dst for src, dst in done if src.startswith(self.dir) and "/_replaced/" not in src]
        self.moved_aside = [dst for _, dst in done if f"/{STALE_DIR}/" in dst]
        for target in self.moved_aside:
            log.warning("moved %s aside: it was made from outputs this %s run replaced", target, self.stage)
        log.info("%s run %s published %s", self.stage, self.run_id, ", ".join(self.published) or "nothing")
        return self.published

    def _downstream(self, downstream_valid) -> list[tuple[str, str]]:
        """(path, stage) of the existing outputs of later stages that no longer hold."""
        found = []
        for stage in STAGES[STAGES.index(self.stage) + 1:]:
            for name in STAGE_OUTPUTS[stage]:
                final = FileSystems.join(self.output_dir, name)
                if _exists(final) and not (downstream_valid is not None and downstream_valid(stage, final)):
                    found.append((final, stage))
        return found

    def _aside(self, final: str) -> str:
        name = final.rstrip("/").rsplit("/", 1)[-1]
        return FileSystems.join(self.output_dir, STALE_DIR, f"{self.stage}-{self.run_id}", name)


def downstream_of_templates(fingerprint: str):
    """A `downstream_valid` for embed: later outputs stay when they were made from templates with
    `fingerprint` (an unchanged catalogue embedded again), judged by the matches' or clusters' lineage."""
    def valid(stage: str, path: str) -> bool:
        tables = {"matches": "matches", "verifications": "verifications", "clusters": "clusters"}
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name in tables:
            try:
                docs = table_lineage(bio.FileSystems.join(path, f"{name}-*.parquet"), name)
            except (FileNotFoundError, LineageError, OSError):
                return False
            return all(d.get("templates", {}).get("fingerprint") == fingerprint for d in docs)
        if name == "match_run.json":
            try:
                return bio.read_json(path).get("templates_lineage", {}).get("fingerprint") == fingerprint
            except (FileNotFoundError, ValueError, OSError):
                return False
        if stage == "report":
            try:
                report_json = bio.FileSystems.join(path.rstrip("/").rsplit("/", 1)[0], "report.json")
                return bio.read_json(report_json).get("lineage", {}).get("templates", {}).get(
                    "fingerprint") == fingerprint
            except (FileNotFoundError, ValueError, OSError):
                return False
        return False
    return valid
