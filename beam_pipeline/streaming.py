"""The streaming dedup: new files in a catalogue location are reported with their duplicates in seconds.

    siamese-dedup watch --input 'drop/**/*.jpg' --model_dir model/ --state dedup_state/ --output watch_out/
    siamese-dedup watch --input 'drop/*.png' --model_dir model/ --templates 'work/templates/*.parquet' \
        --threshold 0.93 --output watch_out/ [--poll_interval 5] [--stop_after_seconds 600]

    MatchContinuously(--input, every --poll_interval s)     (each new file once; a rewritten file again)
      -> only files written since the watcher started (--include_existing: all), none under --output
      -> FindDuplicates:
           ReadNewFileFn: the file's bytes (sources.read_file; item id as embed gives it)   --(read)---> failures
           DecodeNewFileFn: embed's DecodeFn + FirstCopiesFn, one image per element         --(decode)-> failures
           RunInference(EncoderChunkHandler)          the embed stage's model handler       --(inference)> failures
           MatchNewItemsFn: embed's ToTemplatesFn, then the embedding against the index     --(validate)-> failures
             (the catalogue's templates, loaded once per worker process into memory: a Shared handle)
      -> WriteRowsFn: OUTPUT/duplicates/, failures/, checked/  (JSON lines, one file per bundle and kind)
    [-> PacePollsFn: local runs only, see below]

Every new file ends as one `checked` row (its duplicate count and nearest catalogue item) or one
`failures` row (stage and reason: read, decode, inference, validate), and each duplicate found is one
`duplicates` row: every catalogue item at or above the threshold (angular similarity, siamese_core.similarity).
Rows carry `seen_at` (when the watcher read the file), `modified_at` (the file's last-modified time) and
`reported_at` (when the row was written), so the latency of each file is in the output.

The index: `--state S` (a nightly state: nightly_state.current_templates_glob and its angular threshold) or
`--templates GLOB --threshold T`. New files are compared with the index only, not with each other: two
copies dropped in the same minute are both reported against the catalogue, not against each other (the
next nightly run, which indexes them, pairs them). A new file whose item id is in the index is the same
item, not a duplicate of it: that pair is skipped.

Runners. Locally the pipeline runs on Beam's FnApiRunner (beam_pipeline.runner), which resumes a
deferred poll at once rather than after the poll interval: `PacePollsFn` holds each poll back until the
interval has passed since the previous one (on Dataflow, which honours the delay, it is left out). The
whole pipeline is one fused stage there (no Flatten, no GroupByKey), so a poll's rows are written when its
bundle ends. On Dataflow pass the runner flags as for the other stages; the pipeline sets --streaming
itself (not tried on Dataflow here: the tests run the local runner).

For a gs:// bucket of millions of objects, listing the whole glob every poll does not scale (and
MatchContinuously keeps every (path, mtime) it saw): there, Pub/Sub object notifications (OBJECT_FINALIZE,
`beam.io.ReadFromPubSub(subscription=..., with_attributes=True)`, each mapped to 'gs://<bucketId>/<objectId>')
can feed `FindDuplicates` unchanged in place of MatchContinuously. Documented, not built here.

Files should appear whole (rename into place; gs:// objects always do): a file read while half written
becomes a decode failures row, and its complete version, having a new last-modified time, is read again.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
import uuid

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import PredictionResult, RunInference
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.utils import shared
from apache_beam.utils.timestamp import Timestamp

from beam_pipeline import blocks, embed, matching
from beam_pipeline import io as bio
from beam_pipeline import nightly_state, runner, sources
from beam_pipeline.cli import noting_interrupts
from beam_pipeline.inference import EncoderChunkHandler, ImageChunk
from beam_pipeline.options import WatchOptions, new_run_id, parse_stage_options
from siamese_core.similarity import angular_similarity, cosine_from_angular

log = logging.getLogger(__name__)

FAILURES_TAG = embed.FAILURES_TAG
CHECKED_TAG = "checked"
KINDS = ("duplicates", "failures", "checked")
# New embeddings are compared with the index this many bytes of similarities at a time.
MATCH_BLOCK_BYTES = 64 << 20
# A file last modified this long before the watcher started still counts as new (coarse file clocks).
MTIME_SLACK_SECONDS = 1.0
COUNTERS = ("files_seen", "existing_skipped", "checked", "duplicates", "failed", "rows_written")


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso(when: datetime.datetime | float | None) -> str | None:
    """ISO 8601 UTC text of a datetime or epoch seconds (None stays None)."""
    if when is None:
        return None
    if not isinstance(when, datetime.datetime):
        when = datetime.datetime.fromtimestamp(float(when), datetime.timezone.utc)
    return when.isoformat(timespec="microseconds")


def parse_time(text: str) -> float:
    """Epoch seconds of a row's ISO 8601 time (seen_at, modified_at, reported_at)."""
    return datetime.datetime.fromisoformat(text).timestamp()


# ------------------------------------------------------------------------------------------------ index

class CatalogueIndex:
    """The indexed catalogue in memory: item ids, source uris, float32 unit embeddings (n, dim), model id.
    (A plain class: Beam's Shared handle keeps a weak reference to it.)"""

    def __init__(self, item_ids: list, source_uris: list, embeddings: np.ndarray, model_id: str):
        self.item_ids = item_ids
        self.source_uris = source_uris
        self.embeddings = embeddings
        self.model_id = model_id
        self.position = {item_id: k for k, item_id in enumerate(item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)


def load_index(templates_glob: str, model_id: str, dim: int) -> CatalogueIndex:
    """The templates matching `templates_glob` as a CatalogueIndex, checked (matching.check_catalogue: one
    model, unique ids, finite unit rows) and refused unless made by `model_id` with embeddings of `dim`."""
    ids, uris, models, parts = [], [], [], []
    for path, batch in blocks.iter_parquet_batches(templates_glob, ["item_id", "source_uri", "model_id", "embedding"]):
        column = batch.column("embedding")
        if column.null_count or not hasattr(column.type, "list_size") or column.type.list_size != dim:
            raise ValueError(f"templates {path}: embeddings are {column.type}, the model's are {dim}-d float32")
        parts.append(np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim))
        ids.extend(batch.column("item_id").to_pylist())
        uris.extend(batch.column("source_uri").to_pylist())
        models.extend(set(batch.column("model_id").to_pylist()))
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
    found = matching.check_catalogue(ids, embeddings, models)
    if not ids:
        raise ValueError(f"the templates {templates_glob!r} hold no items: nothing to match new files against")
    if found != model_id:
        raise ValueError(f"the templates {templates_glob!r} were made by model {found}, but --model_dir holds model "
                         f"{model_id}: embeddings of different encoders are not comparable")
    return CatalogueIndex(ids, uris, np.ascontiguousarray(embeddings), found)


def resolve_index(opts) -> tuple[str, dict]:
    """(templates glob, threshold {"value", "angular_similarity", "cosine", "source"}) from --state or
    --templates, and --threshold. Raises ValueError for flags that do not belong together."""
    if (opts.state is None) == (opts.templates is None):
        raise ValueError("give one of --state (a nightly state) or --templates (a templates glob, with --threshold)")
    if opts.templates is not None:
        if opts.threshold is None:
            raise ValueError("--templates needs --threshold (an angular similarity); --state brings its own")
        glob, value, source = opts.templates, float(opts.threshold), "given"
    else:
        doc = nightly_state.current(opts.state)
        if doc is None:
            raise FileNotFoundError(f"--state {opts.state}: no committed generation (run `siamese-dedup nightly` "
                                    "first)")
        glob = nightly_state.current_templates_glob(opts.state)
        state_threshold = doc.get("threshold") or {}
        if opts.threshold is not None:
            value, source = float(opts.threshold), "given"
        else:
            if state_threshold.get("score", "angular_similarity") != "angular_similarity" or \
                    state_threshold.get("value") is None:
                raise ValueError(f"--state {opts.state}: its threshold {state_threshold} is not an angular similarity; "
                                 "give --threshold")
            value = float(state_threshold["value"])
            source = f"state {doc.get('generation', '?')} ({state_threshold.get('source', 'unknown')})"
    return glob, {"value": value, "angular_similarity": value, "cosine": float(cosine_from_angular(value)),
                  "source": source}


def match_against_index(embeddings: np.ndarray, item_ids: list, index: CatalogueIndex, cos_threshold: float
                        ) -> list[tuple[list, int, float]]:
    """For each row of float32 unit `embeddings` (n, dim): ([(index row, cosine)] at or above
    `cos_threshold`, most similar first, then by catalogue id; the nearest index row; its cosine).

    A plain matrix product against the index, `MATCH_BLOCK_BYTES` of similarities at a time, compared in
    float32 exactly as the match kernel does (matching.float32_threshold). The index row of the same item
    id, if any, is left out (the same item, not a duplicate of it).
    """
    threshold = matching.float32_threshold(cos_threshold)
    n_index = len(index)
    step = max(1, MATCH_BLOCK_BYTES // (4 * max(1, n_index)))
    out = []
    for start in range(0, len(embeddings), step):
        sims = embeddings[start:start + step] @ index.embeddings.T
        for r in range(len(sims)):
            row = sims[r]
            own = index.position.get(item_ids[start + r])
            if own is not None:
                row[own] = -np.inf
            hits = np.flatnonzero(row >= threshold)
            pairs = sorted(((int(j), float(row[j])) for j in hits), key=lambda p: (-p[1], index.item_ids[p[0]]))
            nearest = int(np.argmax(row)) if n_index and np.isfinite(row).any() else -1
            out.append((pairs, nearest, float(row[nearest]) if nearest >= 0 else float("nan")))
    return out


# ------------------------------------------------------------------------------------------- transforms

class ReadNewFileFn(beam.DoFn):
    """A new file (FileMetadata, or a path) -> (Record, meta) or a failures row ('read').

    meta: {"source_uri", "seen_at" (now), "modified_at" (the file's last-modified time, ISO or None)}. The
    item id is the file's path relative to the glob's prefix (io.item_id_for), as the embed stage gives it.
    """

    def __init__(self, input_glob: str, max_file_bytes: int, run_id: str):
        self._input_glob = input_glob
        self._max_bytes = max_file_bytes
        self._run_id = run_id
        self._seen = runner.counter("files_seen")
        self._failed = runner.counter("failed")

    def process(self, new_file):
        seen_at = utc_now()
        metadata = new_file if isinstance(new_file, FileMetadata) else None
        path = metadata.path if metadata is not None else str(new_file)
        if metadata is None:  # a bare path (a test stream, a notification): its size and time from the filesystem
            try:
                listed = FileSystems.match([path])[0].metadata_list
                metadata = listed[0] if listed else None
            except Exception:  # noqa: BLE001 - read_file below says why it cannot be read
                metadata = None
        self._seen.inc()
        modified = getattr(metadata, "last_updated_in_seconds", None) or None
        meta = {"source_uri": path, "seen_at": iso(seen_at), "modified_at": iso(modified)}
        try:
            item_id = bio.item_id_for(path, self._input_glob)
        except ValueError as err:
            item_id = path
            result = sources.ReadFailure(item_id, path, f"ValueError: {err}")
        else:
            size = getattr(metadata, "size_in_bytes", None)
            result = sources.read_file(path, item_id, self._max_bytes, None if size is None or size < 0 else int(size))
        if isinstance(result, sources.ReadFailure):
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES_TAG, {**embed.read_failure_row(result, self._run_id), **meta})
            return
        yield result, meta


class DecodeNewFileFn(beam.DoFn):
    """(Record, meta) -> ImageChunk of its one image keyed by ((Content,), meta), or a failures row
    ('decode'). The embed stage's own DecodeFn (one image per chunk, so its outputs leave from `process`
    with the element's window) and FirstCopiesFn (no other item shares its bytes in a stream) do the work."""

    def __init__(self, input_spec: dict, max_pixels: int, run_id: str):
        self._decode = embed.DecodeFn(input_spec, max_pixels, run_id, chunk_items=1, threads=1)
        self._first = embed.FirstCopiesFn(input_spec)
        self._failed = runner.counter("failed")

    def setup(self):
        self._decode.setup()

    def teardown(self):
        self._decode.teardown()

    def start_bundle(self):
        self._decode.start_bundle()

    def process(self, element):
        record, meta = element
        for out in self._decode.process(record):
            if isinstance(out, beam.pvalue.TaggedOutput):
                if out.tag == embed.FAILURES_TAG:
                    self._failed.inc()
                    yield beam.pvalue.TaggedOutput(FAILURES_TAG, {**out.value, **meta})
                continue  # CONTENTS_TAG: identical bytes among new files are not looked for
            for chunk in self._first.process(out, {}):
                yield ImageChunk((chunk.key, meta), chunk.pixels)


class MatchNewItemsFn(beam.DoFn):
    """PredictionResult of a new file's ImageChunk -> a `checked` row (CHECKED_TAG), a `duplicates` row per
    index item at or above the threshold (main), or a failures row ('inference' / 'validate', by the embed
    stage's ToTemplatesFn). The index is loaded once per worker process (a Shared handle)."""

    def __init__(self, index_glob: str, handler: EncoderChunkHandler, threshold: dict, run_id: str):
        self._index_glob = index_glob
        self._model_id = handler.model_id
        self._dim = handler.embedding_dim
        self._threshold = dict(threshold)
        self._run_id = run_id
        self._to_templates = embed.ToTemplatesFn(handler.model_id, handler.embedding_dim, run_id)
        self._shared = shared.Shared()
        self._checked = runner.counter("checked")
        self._duplicates = runner.counter("duplicates")
        self._failed = runner.counter("failed")

    def setup(self):
        self._to_templates.setup()
        glob, model_id, dim = self._index_glob, self._model_id, self._dim

        def load():
            started = time.perf_counter()
            index = load_index(glob, model_id, dim)
            log.info("watch: indexed %d catalogue items of %s in %.1f s", len(index), glob,
                     time.perf_counter() - started)
            return index

        self._index = self._shared.acquire(load, tag=(glob, model_id))

    def process(self, result):
        contents, meta = result.example.key
        plain = PredictionResult(ImageChunk(contents, result.example.pixels), result.inference, result.model_id)
        for out in self._to_templates.process(plain):
            if isinstance(out, beam.pvalue.TaggedOutput):
                self._failed.inc()
                yield beam.pvalue.TaggedOutput(FAILURES_TAG, {**out.value, **meta})
                continue
            rows = list(embed.table_rows(out))
            embeddings = np.stack([row["embedding"] for _, row in rows]).astype(np.float32)
            found = match_against_index(embeddings, [item_id for item_id, _ in rows], self._index,
                                        self._threshold["cosine"])
            for (item_id, row), (pairs, nearest, nearest_cos) in zip(rows, found):
                common = {"item_id": item_id, "source_uri": row["source_uri"],
                          "content_sha256": row["content_sha256"], "model_id": self._model_id,
                          "seen_at": meta["seen_at"], "modified_at": meta["modified_at"], "run_id": self._run_id}
                for j, cos in pairs:
                    self._duplicates.inc()
                    yield {**common, "catalogue_item_id": self._index.item_ids[j],
                           "catalogue_source_uri": self._index.source_uris[j],
                           "angular_similarity": float(angular_similarity(cos)), "cosine": cos,
                           "threshold": self._threshold["value"]}
                self._checked.inc()
                yield beam.pvalue.TaggedOutput(CHECKED_TAG, {
                    **common, "duplicates": len(pairs),
                    "nearest_item_id": self._index.item_ids[nearest] if nearest >= 0 else None,
                    "nearest_angular_similarity": float(angular_similarity(nearest_cos)) if nearest >= 0 else None,
                    "threshold": self._threshold["value"]})


class FindDuplicates(beam.PTransform):
    """New files (FileMetadata or paths) -> {"duplicates", "failures", "checked"}: each a tuple of
    PCollections of row dicts (failures come from three steps).

    What feeds it does not matter: MatchContinuously (`build`), a TestStream, Pub/Sub notifications mapped
    to paths. Each input is one new file; the rows say nothing of time reported (WriteRows stamps it)."""

    def __init__(self, input_glob: str, handler: EncoderChunkHandler, index_glob: str, threshold: dict,
                 run_id: str, max_pixels: int, max_file_bytes: int):
        super().__init__()
        self._input_glob = input_glob
        self._handler = handler
        self._index_glob = index_glob
        self._threshold = threshold
        self._run_id = run_id
        self._max_pixels = max_pixels
        self._max_file_bytes = max_file_bytes

    def expand(self, new_files):
        handler = self._handler
        read = new_files | "ReadNewFile" >> beam.ParDo(
            ReadNewFileFn(self._input_glob, self._max_file_bytes, self._run_id)).with_outputs(FAILURES_TAG, main="ok")
        decoded = read.ok | "Decode" >> beam.ParDo(
            DecodeNewFileFn(handler.input_spec, self._max_pixels, self._run_id)).with_outputs(FAILURES_TAG, main="ok")
        matched = (decoded.ok
                   | "Embed" >> RunInference(handler)
                   | "MatchIndex" >> beam.ParDo(MatchNewItemsFn(self._index_glob, handler, self._threshold,
                                                                self._run_id)).with_outputs(
                       FAILURES_TAG, CHECKED_TAG, main="duplicates"))
        # No Flatten: Beam's FnApiRunner materialises a Flatten, which would cut the watching stage in two and
        # hold every row back until the watch ends. WriteRows writes each PCollection where it is.
        return {"duplicates": (matched.duplicates,),
                "failures": (read[FAILURES_TAG], decoded[FAILURES_TAG], matched[FAILURES_TAG]),
                "checked": (matched[CHECKED_TAG],)}


class WriteRowsFn(beam.DoFn):
    """Rows of `kind` -> OUTPUT/<kind>/<kind>-<time>-<run_id>-<random>.jsonl, one file per bundle, each row
    stamped `reported_at` (the time its file is written). Local files are written under a dot name and
    renamed into place, so a reader never sees half a file."""

    def __init__(self, output_dir: str, kind: str, run_id: str):
        self._output_dir = output_dir
        self._kind = kind
        self._run_id = run_id
        self._written = runner.counter("rows_written")

    def start_bundle(self):
        self._rows = []

    def process(self, row):
        self._rows.append(row)

    def finish_bundle(self):
        rows, self._rows = self._rows, []
        if rows:
            self._write(rows)

    def _write(self, rows: list) -> str:
        reported_at = utc_now()
        kind = self._kind
        name = f"{kind}-{reported_at.strftime('%Y%m%dT%H%M%S.%fZ')}-{self._run_id}-{uuid.uuid4().hex[:8]}.jsonl"
        text = "".join(json.dumps({**row, "reported_at": iso(reported_at)}, sort_keys=True) + "\n" for row in rows)
        directory = FileSystems.join(self._output_dir, kind)
        path = FileSystems.join(directory, name)
        if bio._is_local(path):
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{name}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        else:  # an object store: the object appears whole when closed
            with FileSystems.create(path, mime_type="application/x-ndjson",
                                    compression_type=CompressionTypes.UNCOMPRESSED) as f:
                f.write(text.encode("utf-8"))
        self._written.inc(len(rows))
        return path


class WriteRows(beam.PTransform):
    """FindDuplicates' rows ({kind: PCollections}) -> JSON lines under `output_dir`, a WriteRowsFn on each
    PCollection (no Flatten: see FindDuplicates)."""

    def __init__(self, output_dir: str, run_id: str):
        super().__init__()
        self._output_dir = output_dir
        self._run_id = run_id

    def expand(self, rows: dict):
        for kind in KINDS:
            for n, pcoll in enumerate(rows[kind]):
                _ = pcoll | f"Write_{kind}_{n}" >> beam.ParDo(WriteRowsFn(self._output_dir, kind, self._run_id))
        return beam.pvalue.PDone(next(iter(rows[KINDS[0]])).pipeline)


class PacePollsFn(beam.DoFn):
    """Local runs only: start a poll no sooner than `interval` seconds after the previous one began.

    Beam's FnApiRunner resumes a deferred poll at once instead of after the poll interval; without this it
    would list the glob in a busy loop, and MatchContinuously's stop time, counted in polls, would pass in a
    moment. Each poll is one bundle of the watching stage, which holds the whole pipeline (read, decode,
    embed, match, write), so waiting in `start_bundle` (before the poll runs) delays no row: the previous
    poll's rows were written when its bundle finished."""

    def __init__(self, interval: float):
        self._interval = float(interval)
        self._last = None

    def start_bundle(self):
        if self._last is not None:
            rest = self._interval - (time.monotonic() - self._last)
            if rest > 0:
                time.sleep(rest)
        self._last = time.monotonic()

    def process(self, element):
        return []


def is_new(metadata: FileMetadata, since: float, output_dir: str) -> bool:
    """Whether a listed file is one to check: not a folder placeholder, not under --output (the watcher's
    own outputs), and last modified at or after `since` (epoch seconds; 0: any time)."""
    path = metadata.path
    if path.endswith("/"):
        return False
    out = output_dir.rstrip("/") + "/"
    if path.startswith(out) or (bio._is_local(path) and os.path.abspath(path).startswith(os.path.abspath(out))):
        return False
    modified = metadata.last_updated_in_seconds or 0.0
    return not since or modified >= since


class NewFilesFn(beam.DoFn):
    """Listed files -> those `is_new` (the others are counted as existing_skipped)."""

    def __init__(self, since: float, output_dir: str):
        self._since = since
        self._output_dir = output_dir
        self._skipped = runner.counter("existing_skipped")

    def process(self, metadata):
        if is_new(metadata, self._since, self._output_dir):
            yield metadata
        else:
            self._skipped.inc()


def build(pipeline: beam.Pipeline, opts, handler: EncoderChunkHandler, index_glob: str, threshold: dict,
          run_id: str, started: float, pace: bool):
    """Add the watcher to `pipeline`: MatchContinuously(opts.input) -> new files -> FindDuplicates ->
    WriteRows under opts.output [-> PacePollsFn when `pace`]. `started`: epoch seconds the watch began."""
    start = Timestamp.of(started)
    # match_updated_files: a file rewritten (a new last-modified time) is checked again.
    watch_kwargs = {"interval": opts.poll_interval, "start_timestamp": start, "match_updated_files": True}
    if opts.stop_after_seconds:
        watch_kwargs["stop_timestamp"] = start + opts.stop_after_seconds
    # A second of slack: file systems stamp times from a coarse clock.
    since = 0.0 if opts.include_existing else started - MTIME_SLACK_SECONDS
    files = (pipeline
             | "Watch" >> fileio.MatchContinuously(opts.input, **watch_kwargs)
             | "NewFiles" >> beam.ParDo(NewFilesFn(since, opts.output)))
    rows = files | "FindDuplicates" >> FindDuplicates(opts.input, handler, index_glob, threshold, run_id,
                                                       opts.max_pixels, opts.max_file_bytes)
    _ = rows | "WriteRows" >> WriteRows(opts.output, run_id)
    if pace:
        _ = files | "PacePolls" >> beam.ParDo(PacePollsFn(opts.poll_interval))
    return rows


def read_rows(output_dir: str, kind: str, run_id: str | None = None) -> list[dict]:
    """The rows of `kind` ('duplicates', 'failures', 'checked') under `output_dir` (of run `run_id` only
    when given), in file order."""
    pattern = f"{kind}-*-{run_id}-*.jsonl" if run_id else f"{kind}-*.jsonl"
    rows = []
    for path in bio.match_paths(FileSystems.join(output_dir, kind, pattern)):
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            rows.extend(json.loads(line) for line in f.read().decode("utf-8").splitlines() if line.strip())
    return rows


def _is_local_runner(pipeline_options) -> bool:
    return pipeline_options.view_as(StandardOptions).runner in (None,) + runner.LOCAL_RUNNERS


def run(argv=None, test_pipeline=None) -> dict:
    """Watch --input and report the duplicates of new files until --stop_after_seconds, or Ctrl-C.

    Returns {"output", "duplicates", "failures", "checked" (dirs), "run_id", "model_id", "index",
    "index_items", "threshold", "stopped" ("stop_after_seconds" or "interrupted"), "seconds", "counts": rows
    of this run per kind, "counters" (none when interrupted)}. A local run
    executes on Beam's FnApiRunner (DirectRunner names are taken to mean it: Beam's DirectRunner would pick
    its bundle-based engine for an unbounded pipeline, which cannot run MatchContinuously's Watch); other
    runners (Dataflow) get --streaming.
    """
    pipeline_options, opts = parse_stage_options(
        argv, WatchOptions, "Watch a catalogue location for new image files and report their duplicates in the "
        "indexed catalogue (streaming, Beam).")
    started = time.time()  # files last modified since (about) now are new
    run_id = opts.run_id or new_run_id()
    index_glob, threshold = resolve_index(opts)
    handler = EncoderChunkHandler(opts.model_dir, batch_size=opts.batch_size)
    from siamese_core.artefact import load_encoder

    load_encoder(opts.model_dir)  # a wrong or tampered model: one clear error here, not a worker's retries
    index_items = len(load_index(index_glob, handler.model_id, handler.embedding_dim))
    standard = pipeline_options.view_as(StandardOptions)
    local = test_pipeline is None and _is_local_runner(pipeline_options)
    if local:
        standard.runner = runner.LOCAL_RUNNER
    elif test_pipeline is None:
        standard.streaming = True
    log.info("watch run %s: %s every %.1f s with model %s against %d items of %s at angular similarity %.4f (%s) "
             "-> %s", run_id, opts.input, opts.poll_interval, handler.model_id, index_items, index_glob,
             threshold["value"], threshold["source"], opts.output)
    pipeline = runner.new_pipeline(pipeline_options, test_pipeline)
    build(pipeline, opts, handler, index_glob, threshold, run_id, started, pace=local)
    interrupted: list = []
    try:
        with noting_interrupts(interrupted):
            result = runner.run(pipeline, pipeline_options)
    except KeyboardInterrupt:  # a stop, whatever Beam made of it (noting_interrupts)
        if not interrupted:
            raise
        result = None  # Ctrl-C: the way to stop a watch without --stop_after_seconds; written rows are whole
        log.info("watch run %s: stopped by an interrupt", run_id)
    return {
        "output": opts.output,
        **{kind: FileSystems.join(opts.output, kind) for kind in KINDS},
        "run_id": run_id,
        "model_id": handler.model_id,
        "index": index_glob,
        "index_items": index_items,
        "threshold": threshold,
        "stopped": "interrupted" if interrupted else "stop_after_seconds",
        "seconds": round(time.time() - started, 3),
        "counts": {kind: len(read_rows(opts.output, kind, run_id)) for kind in KINDS},
        "counters": {} if result is None else runner.counters(result, COUNTERS),
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(), indent=2, default=str))
