"""The nightly catalogue dedup: only what changed since the last run is embedded and matched.

    siamese-dedup nightly --catalogue 'gs://B/catalogue/**/*.jpg' --model_dir gs://B/model \
        --state gs://B/dedup_state [--run_date 2026-12-03] [--threshold 0.9] [Beam runner flags]

(--serve_at HH:MM instead of --run_date: a process that stays up and runs this every day at HH:MM UTC,
beam_pipeline.nightly_schedule.)

Each run, holding the state's lock (beam_pipeline.nightly_state):
1. lists the catalogue and hashes the bytes (sha256) of every file whose size or modification time moved
   since the last run (--rehash: every file): items added, changed (other bytes) and removed since the
   committed generation;
2. embeds the added and changed items only; a new model_id, a new decode version (siamese_core.decode
   DECODE_VERSION), or no state yet, embeds everything (a full run, stated in the manifest);
3. matches the new templates against the whole catalogue, old and new (every pair at or above the
   threshold), and keeps the previous matches between unchanged items; a full run matches all pairs and,
   unless --threshold is given, self-calibrates the threshold, which later runs keep (so clusters stay
   those of a full recompute at that threshold; --recalibrate starts afresh);
4. clusters the matches again (complete linkage and the keeper policy, so a removed keeper hands over to
   the next by the policy); an incremental run re-clusters only the connected components the night touched
   and keeps the others' clusters (the same items and pairs cluster the same);
5. writes the new generation, the date's outputs (STATE/runs/<run_date>/: manifest.json, clusters/, the
   day's new matches) and commits by pointing CURRENT at the generation, last. A run killed at any step
   leaves the state as it was; re-running a date replaces that date's outputs and starts again from the
   state before it.
Steps 2-4 run as the embed, match and dedup pipelines (--engine beam: the Beam flags given, e.g. Dataflow),
or, for an incremental night of a few thousand items, in this process on the same functions (--engine
local): a DirectRunner pipeline costs 1-2 s to start, more than embedding and matching 500 items (ENGINES).
Angular similarity only: a kNN-normalised score depends on every item's neighbours, which a night's
changes move, so incremental matches would not equal a full recompute's.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import importlib
import logging
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_pipeline import io as bio
from beam_pipeline import nightly_state as ns
from beam_pipeline import clustering, nightly_schedule, outputs, sources
from beam_pipeline.inference import EncoderChunkHandler, kept_encoder
from beam_pipeline.options import POSITIVE_INT, DedupOptions, EmbedOptions, new_run_id
from siamese_core.artefact import load_model_card
from siamese_core.decode import DECODE_VERSION
from schemas.documents import validate_match_run
from schemas.tables import CLUSTERS_SCHEMA, FAILURES_SCHEMA, MATCHES_SCHEMA

LOG = logging.getLogger(__name__)
ITEMS_SCHEMA = pa.schema([("item_id", pa.string()), ("source_uri", pa.string()), ("size", pa.int64()),
                          ("modified", pa.float64()), ("content_sha256", pa.string())])
# Where a test can make a run fail (SIAMESE_DEDUP_NIGHTLY_FAULT=<step>): after each step's work.
FAULT_ENV = "SIAMESE_DEDUP_NIGHTLY_FAULT"
STEPS = ("list", "embed", "templates", "match", "dedup", "outputs", "commit")  # "commit": after it


# Where an incremental run's embed, match and dedup run (--engine).
ENGINES = {
    "auto": "local when the night embeds at most --local_max_items items and the runner is the DirectRunner, "
            "else beam",
    "beam": "the embed, match and dedup pipelines, with the Beam flags given",
    "local": "in this process, on the pipelines' own functions (no pipeline start-up)",
}
LOCAL_MAX_ITEMS = 5000
# Flags of a process that stays up (--serve_at): not Flex Template parameters, as a launch is one night.
SERVICE_FLAGS = ("serve_at",)
LOCAL_RUNNERS = (None, "DirectRunner", "direct", "BundleBasedDirectRunner", "SwitchingDirectRunner")


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for a block that makes Python objects per catalogue item. With
    TensorFlow loaded the heap holds ~500,000 objects, and the full collections that 50,000 new ones set off
    cost more than the work itself (0.4 s of listing 50,000 files took 0.9 s). Reference counting still frees
    everything; only reference cycles made inside wait for the collection after it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class InjectedFault(RuntimeError):
    """Raised where FAULT_ENV asks (tests of recovery)."""


def _fault(step: str) -> None:
    if os.environ.get(FAULT_ENV) == step:
        raise InjectedFault(f"injected fault after step {step!r} ({FAULT_ENV})")


def _run_date(text: str) -> str:
    try:
        return datetime.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"--run_date is a date YYYY-MM-DD, got {text!r}") from None


def _serve_at(text: str):
    try:
        return nightly_schedule.parse_serve_at(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="siamese-dedup nightly",
        description="Nightly incremental dedup of a catalogue: embed and match only what changed since the last "
                    "run, update the clusters, commit a new generation of the state. Other flags go to the Beam "
                    "stages (e.g. --runner DataflowRunner --project P --region R --temp_location gs://B/tmp).")
    parser.add_argument("--catalogue", required=True, help="Glob of the catalogue's image files (local or gs://).")
    parser.add_argument("--model_dir", required=True, help="Encoder artefact directory (model.keras + model_card.json).")
    parser.add_argument("--state", required=True, help="Directory (local or gs://) holding the state between runs.")
    parser.add_argument("--run_date", type=_run_date, default=None,
                        help="The date this run stands for, YYYY-MM-DD (default: today, UTC). Re-running a date "
                             "replaces that date's outputs.")
    parser.add_argument("--threshold", type=float, default=None,
                        help="Angular similarity threshold for a full run (the first, a new model, --recalibrate); "
                             "default: self-calibrated then. Later runs keep the state's threshold.")
    parser.add_argument("--recalibrate", action="store_true",
                        help="Recompute everything and choose the threshold afresh (a full run).")
    parser.add_argument("--linkage", default=clustering.DEFAULT_LINKAGE, choices=clustering.LINKAGES,
                        help="dedup --linkage.")
    parser.add_argument("--keeper_policy", default=clustering.DEFAULT_KEEPER_POLICY,
                        choices=clustering.KEEPER_POLICIES,
                        help=f"dedup --keeper_policy (default {clustering.DEFAULT_KEEPER_POLICY}).")
    parser.add_argument("--engine", default="auto", choices=tuple(ENGINES),
                        help="Where an incremental run embeds, matches and clusters: " +
                             "; ".join(f"{k}: {v}" for k, v in ENGINES.items()) + ". A full run uses the pipelines.")
    parser.add_argument("--local_max_items", type=POSITIVE_INT, default=LOCAL_MAX_ITEMS,
                        help="--engine auto: the most items to embed in this process (the decoded images are held "
                             f"in memory until embedded; default {LOCAL_MAX_ITEMS}).")
    parser.add_argument("--rehash", action="store_true",
                        help="Read and hash every file, also those whose size and modification time are unchanged "
                             "since the last run (by default their hash is taken from the state, as rsync does).")
    parser.add_argument("--serve_at", type=_serve_at, default=None, metavar="HH:MM",
                        help="Stay up as a service and run every day at HH:MM UTC (a night missed while it was down "
                             "runs at its start): TensorFlow and Beam are imported once, not each night "
                             "(beam_pipeline.nightly_schedule; docs/nightly.md). Stop it with SIGINT or SIGTERM.")
    parser.add_argument("--break_lock", action="store_true",
                        help="Remove a lock left by a killed run before starting (only when no other run is going).")
    return parser


# ----------------------------------------------------------------------------------------------- steps

def content_sha256(path: str) -> str | None:
    """sha256 of the file's bytes, or None when it cannot be read (embed then records why)."""
    digest = hashlib.sha256()
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except (OSError, IOError, ValueError):
        return None
    return digest.hexdigest()


def list_items(catalogue: str, before: pa.Table | None = None) -> pa.Table:
    """Every file of the catalogue (ITEMS_SCHEMA): its item id, path, size, modification time and content
    hash, by id. A file whose path, size and modification time equal its row in `before` (the last run's
    items) keeps that row's hash unread, as rsync does by default; without `before` every file is read."""
    listed = sources.list_catalogue(catalogue)
    if not listed:
        raise FileNotFoundError(f"--catalogue {catalogue!r} matches no files")
    paths = [entry.path for entry in listed]
    items = pa.table({"item_id": [bio.item_id_for(path, catalogue) for path in paths], "source_uri": paths,
                      "size": [int(entry.size) for entry in listed], "modified": [entry.modified for entry in listed]},
                     schema=pa.schema([ITEMS_SCHEMA.field(name) for name in ITEMS_SCHEMA.names[:4]]))
    known = None
    if before is not None:  # one join, not a lookup per file: a catalogue has millions
        old = before.filter(pc.and_(pc.is_valid(before.column("modified")),
                                    pc.not_equal(before.column("content_sha256"), "")))
        old = old.select(["source_uri", "size", "modified", "content_sha256"]).rename_columns(
            ["source_uri", "old_size", "old_modified", "content_sha256"])
        items = items.join(old, "source_uri", join_type="left outer")
        same = pc.and_(pc.equal(items.column("size"), items.column("old_size")),
                       pc.equal(items.column("modified"), items.column("old_modified")))
        known = pc.if_else(pc.fill_null(same, False), items.column("content_sha256"), None)
    hashes = [None] * items.num_rows if known is None else known.to_pylist()
    uris = items.column("source_uri").to_pylist()
    hashes = [sha if sha is not None else (content_sha256(uri) or "") for sha, uri in zip(hashes, uris)]
    items = items.select(ITEMS_SCHEMA.names[:4]).append_column(ITEMS_SCHEMA.field("content_sha256"),
                                                               pa.array(hashes, pa.string()))
    return items.cast(ITEMS_SCHEMA).sort_by("item_id")


def diff_items(now: pa.Table, before: pa.Table | None) -> dict:
    """{"added", "changed", "removed", "unchanged"}: sorted item ids. An unreadable file (no hash) counts
    as changed every night, so it is tried again and stays in the failures."""
    hashes = now.select(["item_id", "content_sha256"])
    old = (pa.table({"item_id": pa.array([], pa.string()), "content_sha256": pa.array([], pa.string())})
           if before is None else before.select(["item_id", "content_sha256"]))
    joined = hashes.join(old.rename_columns(["item_id", "old_sha256"]), "item_id", join_type="full outer")
    new_hash, old_hash = joined.column("content_sha256"), joined.column("old_sha256")
    in_now, in_before = pc.is_valid(new_hash), pc.is_valid(old_hash)
    common = pc.and_(in_now, in_before)
    differs = pc.or_(pc.not_equal(new_hash, old_hash), pc.equal(new_hash, ""))
    changed = pc.and_(common, differs)

    def ids(mask) -> list:
        return sorted(joined.column("item_id").filter(mask).to_pylist())

    return {"added": ids(pc.and_(in_now, pc.invert(in_before))), "changed": ids(changed),
            "removed": ids(pc.and_(in_before, pc.invert(in_now))),
            "unchanged": ids(pc.and_(common, pc.invert(changed)))}


def _write_table(table: pa.Table, directory: str, name: str, schema: pa.Schema) -> str:
    """One shard DIR/<name>/<name>-00000-of-00001.parquet (what the stages' readers expect)."""
    path = FileSystems.join(directory, name, f"{name}-00000-of-00001.parquet")
    if bio._is_local(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    # Dictionary pages only for the columns whose values repeat: for per-item ids and embeddings Parquet would
    # build one and give it up (a third of the time it takes to write the templates).
    repeated = [c for c in ("model_id", "run_id", "stage") if c in schema.names]
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        pq.write_table(table.cast(schema), f, use_dictionary=repeated)
    return path


def _read_or_empty(directory: str, name: str, schema: pa.Schema | None = None) -> pa.Table | None:
    glob = bio.table_glob(directory, name)
    if not bio.match_paths(glob, limit=1):
        return None if schema is None else schema.empty_table()
    return bio.read_parquet_table(glob, name)


def _keep(table: pa.Table | None, ids: set, columns=("item_id",)) -> pa.Table | None:
    """Rows of `table` whose every id column is in `ids`."""
    if table is None:
        return None
    mask = None
    value_set = pa.array(list(ids), pa.string())
    for c in columns:
        m = pc.is_in(table.column(c), value_set=value_set)
        mask = m if mask is None else pc.and_(mask, m)
    return table.filter(mask)


def merge_matches(kept: pa.Table | None, new: pa.Table, run_id: str) -> pa.Table:
    """The previous matches between unchanged items and the night's matches (queries mode: each new item
    against the catalogue, new items included) as one matches table: left_id < right_id, no pair with
    itself, each pair once, this run's run_id."""
    new = new.filter(pc.not_equal(new.column("left_id"), new.column("right_id")))
    parts = [t.select(MATCHES_SCHEMA.names).cast(MATCHES_SCHEMA) for t in (kept, new) if t is not None and t.num_rows]
    if not parts:
        return MATCHES_SCHEMA.empty_table()
    table = pa.concat_tables(parts)
    left, right = table.column("left_id"), table.column("right_id")
    swap = pc.greater(left, right)
    table = table.set_column(0, MATCHES_SCHEMA.field("left_id"), pc.if_else(swap, right, left))
    table = table.set_column(1, MATCHES_SCHEMA.field("right_id"), pc.if_else(swap, left, right))
    table = table.set_column(table.schema.get_field_index("run_id"), MATCHES_SCHEMA.field("run_id"),
                             pa.array([run_id] * table.num_rows, pa.string()))
    keys = [f"{a}\t{b}" for a, b in zip(table.column("left_id").to_pylist(), table.column("right_id").to_pylist())]
    _, first = np.unique(np.asarray(keys, dtype=object), return_index=True)
    table = table.take(pa.array(np.sort(first)))
    return table.sort_by([("left_id", "ascending"), ("right_id", "ascending")])


def _copy_tree(src: str, dst: str) -> None:
    """Copy every file under `src` to the same place under `dst` (local or gs://)."""
    files = [m.path for m in FileSystems.match([src.rstrip("/") + "/**"])[0].metadata_list]
    for f in files:
        rel = f[len(src.rstrip("/")) + 1:]
        target = FileSystems.join(dst, rel)
        if bio._is_local(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        FileSystems.copy([f], [target])


# ----------------------------------------------------------------------------------------------- run

def run(argv=None) -> dict:
    """One nightly run; returns its manifest (also written to STATE/runs/<run_date>/manifest.json). With
    --serve_at: the service (beam_pipeline.nightly_schedule), one run a day until stopped; returns its
    summary of the nights."""
    args, beam_args = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.serve_at is not None:
        return _serve(args, beam_args)
    run_date = args.run_date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return _night(args, beam_args, run_date, break_lock=args.break_lock)


def _night(args, beam_args: list[str], run_date: str, break_lock: bool) -> dict:
    run_id = new_run_id()
    state = args.state
    card = load_model_card(args.model_dir)
    if break_lock:
        ns.release_lock(state)
    ns.acquire_lock(state, run_id)
    try:
        return _run_locked(args, beam_args, run_date, run_id, card)
    finally:
        ns.release_lock(state, run_id)


def _serve(args, beam_args: list[str]) -> dict:
    """--serve_at: load what every night needs once (TensorFlow and the encoder, the stages' modules; a
    wrong model is refused now, not at the first night), then run the nights at their hour."""
    from beam_pipeline.cli import noting_interrupts

    if args.run_date is not None:
        raise ValueError("--serve_at runs each night for its own date: give no --run_date")
    for stage in ("embed", "match", "dedup"):  # what a night imports when it first needs it: once, now
        importlib.import_module(f"beam_pipeline.{stage}")
    kept_encoder(EncoderChunkHandler(args.model_dir))  # loaded, checked and traced once; each night reuses it
    if args.break_lock:  # once, at the start: a lock found at a later night is another run's
        ns.release_lock(args.state)
    LOG.info("nightly service: every day at %s UTC, state %s", args.serve_at.strftime("%H:%M"), args.state)

    def last_run_date() -> str | None:
        committed = ns.current(args.state)
        return None if committed is None else committed["run_date"]

    def run_night(run_date: str) -> dict:
        # A stop during the night ends the service, even one a Beam pipeline re-raised as another error.
        with noting_interrupts([]):
            return _night(args, beam_args, run_date, break_lock=False)

    return nightly_schedule.serve(run_night, args.serve_at, last_run_date)


def _base_generation(state: str, run_date: str) -> tuple[dict | None, bool]:
    """(the generation this run starts from, whether it re-runs the committed date)."""
    cur = ns.current(state)
    if cur is None:
        return None, False
    if cur["run_date"] > run_date:
        raise ValueError(f"the state is at {cur['run_date']}, after --run_date {run_date}: runs go forward in time "
                         "(re-run only the last date)")
    if cur["run_date"] == run_date:
        parent = cur.get("parent")
        return (None if parent is None else ns.read_generation(state, parent)), True
    return cur, False


def _run_locked(args, beam_args: list[str], run_date: str, run_id: str, card: dict) -> dict:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    state = args.state
    publish_committed_run(state)  # a run killed after its commit, before its date's outputs were published
    removed_dead = ns.remove_dead_generations(state)
    base, rerun = _base_generation(state, run_date)
    full_reason = _full_run_reason(base, card, args.recalibrate)
    clustering_config = _clustering_doc(args, beam_args)

    t = time.perf_counter()
    before = None if full_reason else pq.read_table(_local_or_buffer(FileSystems.join(base["dir"], ns.ITEMS)))
    with gc_paused():
        items = list_items(args.catalogue, None if args.rehash else before)
        diff = diff_items(items, before)
    timings["list"] = round(time.perf_counter() - t, 3)
    _fault("list")

    name = f"{run_date}-{run_id}"
    gen = ns.generation_dir(state, name)
    work = FileSystems.join(gen, "work")
    to_embed = diff["added"] + diff["changed"]
    engine, engine_why = choose_engine(args.engine, full_reason, len(to_embed), args.local_max_items, beam_args)
    LOG.info("nightly %s: %s (%s)", run_date, engine, engine_why)
    # The local engine makes objects per item in this process: see gc_paused.
    with gc_paused() if engine == "local" else contextlib.nullcontext():
        t = time.perf_counter()
        new_templates, new_failures = _embed_changes(args, beam_args, items, to_embed, work, run_id, engine, card)
        timings["embed"] = round(time.perf_counter() - t, 3)
        _fault("embed")

        t = time.perf_counter()
        unchanged = set(diff["unchanged"])
        templates, failures = _generation_tables(base, unchanged, new_templates, new_failures,
                                                 full_reason is not None, gen)
        timings["templates"] = round(time.perf_counter() - t, 3)
        _fault("templates")

        t = time.perf_counter()
        base_matches = None if full_reason else bio.read_table_dir(base["dir"], "matches")
        threshold, matches, night_matches, fingerprint = _match_step(
            args, beam_args, None if full_reason else base["threshold"], base_matches, unchanged, templates,
            new_templates, full_reason is not None, gen, work, run_id, card, engine)
        timings["match"] = round(time.perf_counter() - t, 3)
        _fault("match")

        t = time.perf_counter()
        if engine == "local":
            touched = touched_items(base_matches, to_embed, diff["removed"] + diff["changed"])
            dedup_summary = _dedup_in_process(args, beam_args, base, clustering_config, gen, templates, matches,
                                              touched, threshold, fingerprint, run_id, card)
        else:
            from beam_pipeline import dedup

            dedup_summary = dedup.run(["--templates", bio.table_glob(gen, "templates"), "--matches",
                                       bio.table_glob(gen, "matches"), "--output", gen, "--linkage", args.linkage,
                                       "--keeper_policy", args.keeper_policy, "--run_id", run_id, *beam_args])
            dedup_summary["reclustered"] = dedup_summary["items"]
        timings["dedup"] = round(time.perf_counter() - t, 3)
        _fault("dedup")

    t = time.perf_counter()
    outputs.delete_path(work)
    manifest = {
        "run_date": run_date, "run_id": run_id, "generation": name,
        "parent": None if base is None else base["generation"], "replaced_date": rerun, "catalogue": args.catalogue,
        "model_dir": args.model_dir, "model_id": card["model_id"], "decode_version": DECODE_VERSION,
        "full": full_reason is not None,
        "full_reason": full_reason, "engine": engine, "engine_why": engine_why,
        "counts": {"items": items.num_rows, "added": len(diff["added"]), "changed": len(diff["changed"]),
                   "removed": len(diff["removed"]), "unchanged": len(diff["unchanged"]),
                   "embedded": 0 if new_templates is None else new_templates.num_rows,
                   "failed": failures.num_rows, "templates": templates.num_rows, "matches": matches.num_rows,
                   "new_matches": night_matches.num_rows, "clusters": dedup_summary.get("clusters_count"),
                   "items_to_drop": dedup_summary.get("items_to_drop"),
                   "reclustered_items": dedup_summary["reclustered"]},
        "clustering": clustering_config,
        "threshold": {k: threshold.get(k) for k in ("value", "score", "angular_similarity", "cosine", "source")},
        "threshold_how": (f"chosen by this full run ({threshold['source']})" if full_reason else
                          f"kept from the state: {base['threshold_how']}"),
        "removed_dead_generations": removed_dead,
        "seconds": timings,
    }
    _write_generation(gen, items, night_matches, manifest, threshold)
    timings["outputs"] = round(time.perf_counter() - t, 3)
    _fault("outputs")

    ns.commit(state, name)
    _fault("commit")
    timings["total"] = round(time.perf_counter() - started, 3)
    bio.write_json(FileSystems.join(gen, RUN_OUTPUTS, "manifest.json"), manifest)  # with the total
    publish_committed_run(state)
    LOG.info("nightly %s: %s", run_date, manifest["counts"])
    return manifest


def _full_run_reason(base: dict | None, card: dict, recalibrate: bool) -> str | None:
    """Why this run embeds and matches everything, or None for an incremental run."""
    if base is None:
        return "no earlier state"
    if base["model_id"] != card["model_id"]:
        return f"new model {card['model_id']} (the state's templates are of {base['model_id']}): full re-embed"
    decoded_by = base.get("decode_version", 1)  # states written before versions were recorded: version 1
    if decoded_by != DECODE_VERSION:
        return (f"decode version {DECODE_VERSION} (the state's templates were decoded by version {decoded_by}: "
                "the same files give other pixels now): full re-embed")
    return "--recalibrate" if recalibrate else None


def choose_engine(requested: str, full_reason: str | None, n_to_embed: int, local_max_items: int,
                  beam_args: list[str]) -> tuple[str, str]:
    """("beam" or "local", why) for this run (ENGINES)."""
    if full_reason is not None:
        return "beam", "a full run uses the pipelines"
    if requested != "auto":
        return requested, f"--engine {requested}"
    runner_name = PipelineOptions(beam_args).view_as(StandardOptions).runner
    if runner_name not in LOCAL_RUNNERS:
        return "beam", f"--runner {runner_name}"
    if n_to_embed > local_max_items:
        return "beam", f"{n_to_embed} items to embed, more than --local_max_items {local_max_items}"
    return "local", f"{n_to_embed} items to embed, at most --local_max_items {local_max_items}"


def _clustering_doc(args, beam_args: list[str]) -> dict:
    """The clustering settings of this run (nightly's and dedup's flags), recorded in the state: an
    incremental run keeps the earlier clusters of untouched components only when they are the same."""
    dedup_opts = PipelineOptions(beam_args).view_as(DedupOptions)
    if args.keeper_policy == "column" and not (dedup_opts.keeper_table and dedup_opts.keeper_column):
        raise ValueError("--keeper_policy column needs --keeper_table and --keeper_column")
    return {"linkage": args.linkage, "keeper_policy": args.keeper_policy, "keeper_order": dedup_opts.keeper_order,
            "keeper_table": dedup_opts.keeper_table, "keeper_column": dedup_opts.keeper_column,
            "chain_margin": dedup_opts.chain_margin, "max_diameter_members": dedup_opts.max_diameter_members}


def _embed_changes(args, beam_args, items: pa.Table, to_embed: list[str], work: str, run_id: str, engine: str,
                   card: dict) -> tuple[pa.Table | None, pa.Table | None]:
    """Embed the listed items only: (their templates, their failures), or (None, None) when there are none.
    beam: the embed pipeline (--input_list) into WORK/embedded; local: embed.embed_files_locally."""
    from beam_pipeline import embed

    if not to_embed:
        return None, None
    rows = _keep(items, set(to_embed))
    if engine == "local":
        opts = PipelineOptions(beam_args).view_as(EmbedOptions)
        handler = EncoderChunkHandler(args.model_dir, batch_size=opts.batch_size, card=card)
        listed = list(zip(rows.column("source_uri").to_pylist(), rows.column("size").to_pylist()))
        return embed.embed_files_locally(listed, args.catalogue, handler, run_id, max_file_bytes=opts.max_file_bytes,
                                         max_pixels=opts.max_pixels, threads=opts.decode_threads)
    night = FileSystems.join(work, "embedded")
    with tempfile.TemporaryDirectory() as tmp:
        list_file = os.path.join(tmp, "input_list.txt")
        with open(list_file, "w") as f:
            f.write("\n".join(rows.column("source_uri").to_pylist()) + "\n")
        embed.run(["--input", args.catalogue, "--input_list", list_file, "--model_dir", args.model_dir,
                   "--output", night, "--run_id", run_id, "--allow_all_failed", *beam_args])
    return _read_or_empty(night, "templates"), _read_or_empty(night, "failures", FAILURES_SCHEMA)


def _concat(tables, schema: pa.Schema | None = None) -> pa.Table | None:
    """The rows of the tables that exist (None: no table at all; with `schema`, an empty table instead)."""
    present = [t if schema is None else t.select(schema.names) for t in tables if t is not None]
    if not present:
        return None if schema is None else schema.empty_table()
    return pa.concat_tables(present)


def _generation_tables(base: dict | None, unchanged: set, new_templates: pa.Table | None,
                       new_failures: pa.Table | None, full: bool, gen: str) -> tuple[pa.Table, pa.Table]:
    """Write the generation's templates and failures: the unchanged items' rows carried over from the base
    generation, then the night's. Returns (templates, failures)."""
    kept_templates = None if full else _keep(bio.read_table_dir(base["dir"], "templates"), unchanged)
    kept_failures = None if full else _keep(_read_or_empty(base["dir"], "failures", FAILURES_SCHEMA), unchanged)
    templates = _concat([t for t in (kept_templates, new_templates) if t is not None and t.num_rows])
    if templates is None:
        raise ValueError("no item of the catalogue could be embedded: nothing to deduplicate")
    templates = templates.sort_by("item_id")
    _write_table(templates, gen, "templates", templates.schema)
    failures = _concat([kept_failures, new_failures], FAILURES_SCHEMA)
    _write_table(failures, gen, "failures", FAILURES_SCHEMA)
    return templates, failures


def _match_step(args, beam_args, base_threshold: dict | None, base_matches: pa.Table | None, unchanged: set,
                templates: pa.Table, new_templates: pa.Table | None, full: bool, gen: str, work: str, run_id: str,
                card: dict, engine: str) -> tuple[dict, pa.Table, pa.Table, dict]:
    """The generation's matches (written with their lineage, and a match_run.json for the report):
    a full run matches all pairs (self-calibrated unless --threshold); an incremental one matches the night's
    templates against all of them at the state's threshold (the match pipeline in queries mode, or
    match.match_queries_in_process) and keeps the earlier matches between unchanged items.
    Returns (threshold, all matches, the night's matches, the templates' fingerprint)."""
    from beam_pipeline import match

    templates_glob = bio.table_glob(gen, "templates")
    out = FileSystems.join(work, "match")
    fingerprint = outputs.table_fingerprint([templates])
    if full:
        given = [] if args.threshold is None else ["--threshold", str(args.threshold)]
        match.run(["--templates", templates_glob, "--model_dir", args.model_dir, "--output", out,
                   "--score_norm", "none", "--run_id", run_id, *given, *beam_args])
        run_path = FileSystems.join(out, "match_run.json")
        threshold = validate_match_run(bio.read_json(run_path), run_path)["threshold"]
        night = merge_matches(None, bio.read_table_dir(out, "matches"), run_id)
        matches = night
    else:
        threshold = base_threshold
        night = MATCHES_SCHEMA.empty_table()
        if new_templates is not None and new_templates.num_rows and engine == "local":
            found = match.match_queries_in_process(new_templates, templates, float(threshold["cosine"]),
                                                   card["model_id"], run_id)
            night = merge_matches(None, found, run_id)
        elif new_templates is not None and new_templates.num_rows:
            match.run(["--templates", templates_glob, "--mode", "queries", "--queries",
                       bio.table_glob(FileSystems.join(work, "embedded"), "templates"), "--top_k", "0",
                       "--threshold", repr(float(threshold["value"])), "--score_norm", "none",
                       "--output", out, "--run_id", run_id, *beam_args])
            night = merge_matches(None, bio.read_table_dir(out, "matches"), run_id)
        kept = _keep(base_matches, unchanged, ("left_id", "right_id"))
        matches = merge_matches(kept, night, run_id)
    lineage = {"stage": "match", "run_id": run_id, "model_id": card["model_id"],
               "templates": fingerprint, "threshold": threshold["value"],
               "score": "angular_similarity", "threshold_source": threshold["source"], "mode": "nightly",
               "search": "exact"}
    _write_table(matches, gen, "matches", outputs.with_lineage(MATCHES_SCHEMA, lineage))
    run_path = FileSystems.join(gen, "match_run.json")
    bio.write_json(run_path, validate_match_run({
        "run_id": run_id, "model_id": card["model_id"], "mode": "all_pairs", "search": "exact",
        "items": fingerprint["items"], "pairs": matches.num_rows, "threshold": threshold, "nightly": {"full": full}},
        run_path))
    return threshold, matches, night, fingerprint


def touched_items(base_matches: pa.Table | None, embedded: list[str], gone: list[str]) -> set:
    """The items whose matches may differ from the base generation's: those embedded tonight (added or
    changed) and the earlier partners of items removed or changed (`gone`)."""
    touched = set(embedded)
    if base_matches is None or not gone or not base_matches.num_rows:
        return touched
    value_set = pa.array(sorted(gone), pa.string())
    for this, other in (("left_id", "right_id"), ("right_id", "left_id")):
        hit = pc.is_in(base_matches.column(this), value_set=value_set)
        touched.update(base_matches.column(other).filter(hit).to_pylist())
    return touched


def _dedup_in_process(args, beam_args, base: dict, clustering_config: dict, gen: str, templates: pa.Table,
                      matches: pa.Table, touched: set, threshold: dict, fingerprint: dict, run_id: str,
                      card: dict) -> dict:
    """The dedup step of the local engine: the clusters of the generation (dedup.recluster of the touched
    components when the base was clustered the same way, else dedup.cluster_in_process of all), written
    with the dedup pipeline's lineage. Returns dedup's summary keys used by the manifest."""
    from beam_pipeline import dedup

    config = clustering.ClusterConfig(
        linkage=args.linkage, keeper_policy=args.keeper_policy, keeper_order=clustering_config["keeper_order"],
        threshold=float(threshold["value"]), chain_margin=clustering_config["chain_margin"],
        max_diameter_members=clustering_config["max_diameter_members"])
    keeper_values = None
    if args.keeper_policy == "column":
        keeper_values = dedup.read_keeper_values(clustering_config["keeper_table"], clustering_config["keeper_column"])
    # A keeper table may change between nights: its clusters are recomputed whole.
    same_clustering = base.get("clustering") == clustering_config and args.keeper_policy != "column"
    if same_clustering:
        clusters, reclustered = dedup.recluster(bio.read_table_dir(base["dir"], "clusters"), templates, matches,
                                                touched, config, run_id, keeper_values)
    else:
        clusters = dedup.cluster_in_process(templates, matches, config, run_id, keeper_values)
        reclustered = clusters.num_rows
    made_by = {"run_id": run_id, "threshold": threshold["value"]}  # the matches' lineage (_match_step)
    lineage = dedup.lineage_of(run_id, card["model_id"], fingerprint, made_by, config.threshold, args.linkage,
                               args.keeper_policy)
    _write_table(clusters, gen, "clusters", outputs.with_lineage(CLUSTERS_SCHEMA, lineage))
    return {**dedup.summary_of(clusters), "reclustered": reclustered}


# What a run publishes under STATE/runs/<run_date>/, staged inside its generation until it is committed.
RUN_OUTPUTS = "run_outputs"


def _write_generation(gen: str, items: pa.Table, night_matches: pa.Table, manifest: dict, threshold: dict) -> None:
    """Everything of the generation but the commit: items.parquet, state.json, and the date's outputs
    (manifest.json, clusters/, the night's matches/) staged under RUN_OUTPUTS."""
    with FileSystems.create(FileSystems.join(gen, ns.ITEMS), compression_type=CompressionTypes.UNCOMPRESSED) as f:
        pq.write_table(items, f)
    staged = FileSystems.join(gen, RUN_OUTPUTS)
    _copy_tree(FileSystems.join(gen, "clusters"), FileSystems.join(staged, "clusters"))
    _write_table(night_matches, staged, "matches", MATCHES_SCHEMA)
    bio.write_json(FileSystems.join(staged, "manifest.json"), manifest)
    bio.write_json(FileSystems.join(gen, ns.STATE_DOC), {
        "generation": manifest["generation"], "parent": manifest["parent"], "run_date": manifest["run_date"],
        "run_id": manifest["run_id"], "model_id": manifest["model_id"], "decode_version": manifest["decode_version"],
        "catalogue": manifest["catalogue"],
        "threshold": threshold, "threshold_how": manifest["threshold_how"], "clustering": manifest["clustering"],
        "counts": manifest["counts"]})


def publish_committed_run(state: str) -> bool:
    """Make STATE/runs/<date>/ the committed generation's outputs when it is not already (a run killed
    between its commit and this step is finished by the next one). Whether anything was copied."""
    cur = ns.current(state)
    if cur is None:
        return False
    day = ns.run_dir(state, cur["run_date"])
    published = FileSystems.join(day, "manifest.json")
    if FileSystems.exists(published) and bio.read_json(published).get("generation") == cur["generation"]:
        return False
    outputs.delete_path(day)
    _copy_tree(FileSystems.join(cur["dir"], RUN_OUTPUTS), day)
    return True


def _local_or_buffer(path: str):
    if bio._is_local(path):
        return path
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return pa.BufferReader(f.read())


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    print(run())
