"""The embed pipeline: a catalogue in (image files, TFRecord, Parquet or tar shards; local or gs://),
templates (one embedding per item) and failures out.

    ReadCatalogue(--input)                     (spread by file / shard / row group)  --(read error)-----> failures
      -> decode to the card's input spec, in chunks of CHUNK_ITEMS images           --(decode error)---> failures
           \-> (content_sha256, item) per image -> GroupByKey -> contents several items share (side input)
      -> FirstCopies: of identical bytes, only the first item's pixels go on
      -> RunInference(EncoderChunkHandler)  (chunks gathered into batches of --batch_size images)
                                                                                     --(inference error)> failures
      -> a templates Table per chunk: a row per item, copies included (embedding checked) --(bad output)-> failures
      -> [record formats: one template per item_id]                                  --(repeated id)----> failures
      -> OUTPUT/templates/templates-*.parquet    OUTPUT/failures/failures-*.parquet
         [OUTPUT/labels/labels-*.parquet with --label_key]

Every item read ends as exactly one templates row or one failures row. Byte-identical items are embedded
once and share the embedding (each keeps its own row); `inferences_saved` says how many model evaluations
that spared. After decoding, the pipeline's elements are chunks of images rather than images: the runner's
cost per element is larger than the cost of decoding a small image. The model card drives the decode (size,
channels, value range), the embedding dimension of the table and the `model_id` column: nothing is
configured twice.

Runs locally by default, on the DirectRunner's engine (beam_pipeline.runner);
`--runner DataflowRunner` with `--setup_file ./setup.py` (or a worker image, docs/gpu_worker.md) runs the
same code on Dataflow.

    python -m beam_pipeline.embed --input 'catalogue/images/*.png' --model_dir model --output out
"""
from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import logging
import os
import time
from typing import NamedTuple, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import DebugOptions
from apache_beam.transforms import window

from beam_pipeline import io as bio
from beam_pipeline import outputs, runner, sources
from siamese_core.decode import DecodeError, decode_image, spec_shape
from beam_pipeline.inference import EncoderChunkHandler, ImageChunk, chunk_size, kept_encoder
from beam_pipeline.options import EmbedOptions, new_run_id, parse_stage_options
# UNIT_NORM_TOLERANCE: the readers' (schemas.validate_table) tolerance, so a row they would refuse goes to
# failures instead.
from schemas.tables import FAILURES_SCHEMA, LABELS_SCHEMA, UNIT_NORM_TOLERANCE, templates_schema

log = logging.getLogger(__name__)

FAILURES_TAG = sources.FAILURES_TAG
CONTENTS_TAG = "contents"
# Images per pipeline element after decoding (a divisor of the default --batch_size).
CHUNK_ITEMS = 64
# Paths listed up front to check --input and detect its format (auto).
FORMAT_SAMPLE = 1000
# Workers log a progress line every this many templates, or this many seconds.
PROGRESS_EVERY = 2000
PROGRESS_SECONDS = 30.0
COUNTERS = ("items_read", "read_failed", "decoded", "decode_failed", "inferences", "inferences_saved",
            "embedded", "failed")


class ItemRef(NamedTuple):
    """One catalogue item that has a given content."""

    item_id: str
    source_uri: str


class Content(NamedTuple):
    """A distinct content (byte string) of the catalogue, as it travels through inference.

    items: every item with these bytes, sorted (the first is the one whose pixels are embedded);
    width, height: the image's size as displayed.
    """

    content_sha256: str
    items: tuple
    width: int
    height: int


def failure_row(item_id: str, source_uri: str, stage: str, error, run_id: str) -> dict:
    """A failures-table row; `error` is an exception (written as 'Type: message') or a string."""
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    return {"item_id": item_id, "source_uri": source_uri, "stage": stage, "error": str(error)[:2000],
            "run_id": run_id}


def check_embedding(embedding: np.ndarray, dim: int) -> str | None:
    """Why `embedding` cannot be a template (wrong shape, NaN/inf, not unit norm), or None if it can."""
    embedding = np.asarray(embedding)
    if embedding.shape != (dim,):
        return f"embedding has shape {embedding.shape}, expected ({dim},)"
    if not np.isfinite(embedding).all():
        return "embedding has NaN or infinite components"
    norm = float(np.linalg.norm(embedding.astype(np.float64)))
    if abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
        return f"embedding norm is {norm:.6f}, not 1"
    return None


def embedding_problems(embeddings: np.ndarray) -> np.ndarray:
    """Row mask of float32 (n, dim) `embeddings` that `check_embedding` would refuse (NaN/inf, not unit)."""
    finite = np.isfinite(embeddings).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], embeddings, 0).astype(np.float64), axis=1)
    return ~finite | (np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)


def decode_threads(requested: int) -> int:
    """Threads a DecodeFn decodes with: `requested`, or when 0 the machine's cores (at most 4)."""
    return requested if requested > 0 else max(1, min(4, os.cpu_count() or 1))


class DecodeFn(beam.DoFn):
    """Records -> chunks of up to `chunk_items` decoded images; undecodable -> failures row ('decode').

    Main output, one element per chunk, plain values (Beam encodes them without pickling):
    (content sha256s, (item_id, source_uri) per image, (width, height) per image, the uint8 pixels of all
    images, (n, H, W, C) of the input spec, as bytes). A chunk, not an image, is the pipeline's element
    from here to the templates: per-element costs of the runner would otherwise exceed the decoding.
    CONTENTS_TAG output: (sha256, (item_id, source_uri)) per decoded image, to find identical bytes.

    Records are decoded `chunk_items` at a time on `threads` threads: Pillow's decoders and resampling
    and hashlib release the GIL, so a worker's idle cores decode while its runner thread moves elements.
    Outputs keep the records' order.
    """

    def __init__(self, input_spec: dict, max_pixels: int, run_id: str, chunk_items: int = CHUNK_ITEMS,
                 threads: int = 1):
        self._input_spec = dict(input_spec)
        self._max_pixels = max_pixels
        self._run_id = run_id
        self._chunk_items = chunk_items
        self._threads = threads
        self._decoded = runner.counter("decoded")
        self._decode_failed = runner.counter("decode_failed")
        self._failed = runner.counter("failed")

    def setup(self):
        self._pool = (concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="decode")
                      if self._threads > 1 else None)

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def start_bundle(self):
        self._pending, self._chunk = [], []

    def process(self, record: sources.Record):
        self._pending.append(record)
        if len(self._pending) >= self._chunk_items:
            yield from self._decode_pending()

    def finish_bundle(self):
        outputs = list(self._decode_pending())
        if self._chunk:
            outputs.append(self._flush())
        # Batch pipelines only: what is left leaves in the global window.
        at_end = window.GlobalWindows.windowed_value_at_end_of_window
        for out in outputs:
            yield (beam.pvalue.TaggedOutput(out.tag, at_end(out.value))
                   if isinstance(out, beam.pvalue.TaggedOutput) else at_end(out))

    def _decode_one(self, record: sources.Record) -> tuple:
        """(record, decoded image, sha256) or (record, None, the exception). Runs on a pool thread."""
        try:
            return record, decode_image(record.data, self._input_spec, self._max_pixels), \
                hashlib.sha256(record.data).hexdigest()
        except Exception as err:  # DecodeError, or a decoder bug: the item fails, the pipeline does not
            return record, None, err

    def _decode_pending(self):
        pending, self._pending = self._pending, []
        results = self._pool.map(self._decode_one, pending) if self._pool else map(self._decode_one, pending)
        for record, decoded, outcome in results:
            if decoded is None:
                if not isinstance(outcome, DecodeError):
                    log.warning("decode: unexpected %s on %s", type(outcome).__name__, record.source_uri)
                self._decode_failed.inc()
                self._failed.inc()
                yield beam.pvalue.TaggedOutput(
                    FAILURES_TAG, failure_row(record.item_id, record.source_uri, "decode", outcome, self._run_id))
                continue
            item = (record.item_id, record.source_uri)
            self._chunk.append((outcome, item, (decoded.width, decoded.height), decoded.pixels.tobytes()))
            yield beam.pvalue.TaggedOutput(CONTENTS_TAG, (outcome, item))
            if len(self._chunk) >= self._chunk_items:
                yield self._flush()

    def _flush(self) -> tuple:
        shas, items, sizes, pixels = zip(*self._chunk)
        self._decoded.inc(len(self._chunk))
        self._chunk = []
        return shas, items, sizes, b"".join(pixels)


def shared_contents(element) -> list[tuple[str, tuple]]:
    """(sha256, items with those bytes) -> [(sha256, sorted items)] if several items share them, else []."""
    sha256, items = element
    return [(sha256, tuple(sorted(tuple(i) for i in items)))] if len(items) > 1 else []


class FirstCopiesFn(beam.DoFn):
    """Decoded chunk -> ImageChunk of the images to embed, keyed by their Content: an image whose bytes
    other items share is embedded only if it is the first of them (`duplicates`: sha256 -> sorted items,
    a side input of the shared contents only); its Content lists them all."""

    def __init__(self, input_spec: dict):
        self._shape = spec_shape(input_spec)

    def process(self, chunk, duplicates):
        shas, items, sizes, data = chunk
        pixels = np.frombuffer(data, dtype=np.uint8).reshape((len(shas),) + self._shape)
        keep, contents = [], []
        for i, (sha256, item) in enumerate(zip(shas, items)):
            group = duplicates.get(sha256)
            if group is None:
                group = (tuple(item),)
            elif tuple(item) != group[0]:
                continue  # a later copy: its template comes with the first's
            keep.append(i)
            contents.append(Content(sha256, tuple(ItemRef(*g) for g in group), *sizes[i]))
        if keep:
            yield ImageChunk(tuple(contents), pixels if len(keep) == len(shas) else pixels[keep])


class ToTemplatesFn(beam.DoFn):
    """PredictionResult of an ImageChunk -> one templates Table with a row per item (copies included);
    items whose embedding failed or is invalid -> failures rows ('inference' / 'validate'). Logs a
    progress line every PROGRESS_EVERY rows or PROGRESS_SECONDS."""

    def __init__(self, model_id: str, dim: int, run_id: str):
        self._model_id = model_id
        self._dim = dim
        self._run_id = run_id
        self._embedded = runner.counter("embedded")
        self._inferences = runner.counter("inferences")
        self._saved = runner.counter("inferences_saved")
        self._failed = runner.counter("failed")

    def setup(self):
        self._count = 0
        self._started = self._last_log = time.perf_counter()

    def process(self, result):
        contents, out = result.example.key, result.inference
        embeddings = np.asarray(out.embeddings, dtype=np.float32)
        invalid = embedding_problems(embeddings) if len(embeddings) else np.zeros(0, bool)
        rows, columns = [], {"item_id": [], "source_uri": [], "content_sha256": [], "width": [], "height": []}
        failed = 0
        for j, content in enumerate(contents):
            error, stage = out.errors.get(j), "inference"
            if error is None and invalid[j]:
                error, stage = check_embedding(embeddings[j], self._dim) or "embedding is invalid", "validate"
            if error is not None:
                failed += len(content.items)
                for item in content.items:
                    yield beam.pvalue.TaggedOutput(
                        FAILURES_TAG, failure_row(item.item_id, item.source_uri, stage, error, self._run_id))
                continue
            for item in content.items:
                rows.append(j)
                columns["item_id"].append(item.item_id)
                columns["source_uri"].append(item.source_uri)
                columns["content_sha256"].append(content.content_sha256)
                columns["width"].append(content.width)
                columns["height"].append(content.height)
        if failed:
            self._failed.inc(failed)
        if not rows:
            return
        n, embedded_contents = len(rows), len(set(rows))
        self._embedded.inc(n)
        self._inferences.inc(embedded_contents)
        self._saved.inc(n - embedded_contents)
        yield templates_table(columns, embeddings[rows], self._model_id, self._run_id,
                              datetime.datetime.now(datetime.timezone.utc))
        self._progress(n)

    def _progress(self, n: int) -> None:
        before, self._count = self._count, self._count + n
        clock = time.perf_counter()
        if self._count // PROGRESS_EVERY > before // PROGRESS_EVERY or clock - self._last_log > PROGRESS_SECONDS:
            self._last_log = clock
            log.info("embed progress: %d items embedded by this worker (%.0f items/s)", self._count,
                     self._count / max(clock - self._started, 1e-9))


def templates_table(columns: dict, embeddings: np.ndarray, model_id: str, run_id: str,
                    embedded_at: datetime.datetime) -> pa.Table:
    """A templates Table (schema templates_schema(dim)) from per-row lists `columns` (item_id, source_uri,
    content_sha256, width, height) and float32 (n, dim) `embeddings`; model_id, run_id and embedded_at
    are the same for every row."""
    n, dim = embeddings.shape
    schema = templates_schema(dim)
    flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1), pa.float32())
    arrays = {
        "item_id": pa.array(columns["item_id"], pa.string()),
        "source_uri": pa.array(columns["source_uri"], pa.string()),
        "content_sha256": pa.array(columns["content_sha256"], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        "model_id": pa.array([model_id] * n, pa.string()),
        "width": pa.array(columns["width"], pa.int32()),
        "height": pa.array(columns["height"], pa.int32()),
        "embedded_at": pa.array([embedded_at] * n, schema.field("embedded_at").type),
        "run_id": pa.array([run_id] * n, pa.string()),
    }
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


def table_rows(table: pa.Table):
    """(item_id, row dict) per row of a templates Table (embedding as float32 numpy)."""
    embeddings = np.asarray(table.column("embedding").combine_chunks().flatten(), np.float32).reshape(
        table.num_rows, -1)
    for i, row in enumerate(table.drop_columns(["embedding"]).to_pylist()):
        row["embedding"] = embeddings[i]
        yield row["item_id"], row


def uri_order(source_uri: str) -> tuple:
    """Sort key of source URIs that orders '<shard>#<position>' by shard, then position as a number."""
    shard, _, position = source_uri.rpartition("#")
    return (shard, 0, int(position), "") if position.isdigit() else (shard, 1, 0, position)


class UniqueIdsFn(beam.DoFn):
    """(item_id, template rows) -> the row read first (`uri_order`); any other row of that id becomes
    a failures row ('validate'): ids read from shards may repeat, and the templates table's may not."""

    def __init__(self, run_id: str):
        self._run_id = run_id
        self._embedded = runner.counter("embedded")
        self._failed = runner.counter("failed")

    def process(self, element):
        item_id, rows = element
        rows = sorted(rows, key=lambda r: uri_order(r["source_uri"]))
        yield rows[0]
        for row in rows[1:]:
            self._embedded.dec()
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES_TAG, failure_row(
                item_id, row["source_uri"], "validate",
                f"duplicate item_id: also read from {rows[0]['source_uri']}, which was kept", self._run_id))


def read_failure_row(failure: sources.ReadFailure, run_id: str) -> dict:
    return failure_row(failure.item_id, failure.source_uri, "read", failure.error, run_id)


def resolve_input_format(opts: EmbedOptions, paths: list[str]) -> str:
    """--input_format, or the format the matched paths' suffixes imply when it is 'auto'."""
    if opts.input_format != "auto":
        return opts.input_format
    return sources.detect_format(paths)


def build(pipeline: beam.Pipeline, opts: EmbedOptions, handler: EncoderChunkHandler, run_id: str,
          input_format: str = "files", output_dir: str | None = None) -> None:
    """Add the embed transforms to `pipeline`: `opts.input` -> templates and failures under `output_dir`
    (default `opts.output`; `run` gives its staging directory), each shard carrying `lineage_of` the run."""
    output_dir = output_dir or opts.output
    lineage = lineage_of(opts, handler, run_id)
    keys = sources.RecordKeys(image=opts.image_key, id=opts.id_key, label=opts.label_key)
    records, read_failures = pipeline | "Read" >> sources.ReadCatalogue(
        opts.input, input_format, keys, opts.max_file_bytes, paths=read_input_list(opts.input_list, opts.input))
    decode = DecodeFn(handler.input_spec, opts.max_pixels, run_id, threads=decode_threads(opts.decode_threads))
    decoded = records | "Decode" >> beam.ParDo(decode).with_outputs(FAILURES_TAG, CONTENTS_TAG, main="chunks")
    # Contents that several items share (usually few): a side input, so the images travel in chunks.
    duplicates = (decoded[CONTENTS_TAG]
                  | "GatherItemsByContent" >> beam.GroupByKey()
                  | "SharedContents" >> beam.FlatMap(shared_contents))
    predictions = (decoded.chunks
                   | "FirstCopies" >> beam.ParDo(FirstCopiesFn(handler.input_spec),
                                                 duplicates=beam.pvalue.AsDict(duplicates))
                   | "Embed" >> RunInference(handler))
    tables = predictions | "ToTemplates" >> beam.ParDo(
        ToTemplatesFn(handler.model_id, handler.embedding_dim, run_id)).with_outputs(FAILURES_TAG, main="ok")
    templates = tables.ok
    failures = [read_failures | "ReadFailureRows" >> beam.Map(read_failure_row, run_id),
                decoded[FAILURES_TAG], tables[FAILURES_TAG]]
    if input_format != "files":  # file paths are unique ids; ids read from records may repeat
        unique = (templates
                  | "KeyById" >> beam.FlatMap(table_rows)
                  | "GroupById" >> beam.GroupByKey()
                  | "UniqueIds" >> beam.ParDo(UniqueIdsFn(run_id)).with_outputs(FAILURES_TAG, main="ok"))
        templates = unique.ok
        failures.append(unique[FAILURES_TAG])

    _ = templates | "WriteTemplates" >> bio.WriteTable(
        output_dir, "templates", outputs.with_lineage(templates_schema(handler.embedding_dim), lineage),
        num_shards=opts.num_shards, row_group_rows=opts.row_group_rows)
    # Written even when empty (one empty shard), so readers always find the table.
    _ = (tuple(failures) | "AllFailures" >> beam.Flatten()
         | "WriteFailures" >> bio.WriteTable(output_dir, "failures", outputs.with_lineage(FAILURES_SCHEMA, lineage),
                                             num_shards=opts.num_shards))
    if opts.label_key is not None:
        _ = (records
             | "Labelled" >> beam.Filter(lambda r: r.label is not None)
             | "LabelRows" >> beam.Map(lambda r, run: {"item_id": r.item_id, "source_uri": r.source_uri,
                                                       "label": r.label, "run_id": run}, run_id)
             | "WriteLabels" >> bio.WriteTable(output_dir, "labels", outputs.with_lineage(LABELS_SCHEMA, lineage),
                                             num_shards=opts.num_shards))


def _unwindowed(output):
    """A DoFn's output as `process` gives it: finish_bundle wraps values in WindowedValues."""
    if isinstance(output, beam.pvalue.TaggedOutput):
        return beam.pvalue.TaggedOutput(output.tag, getattr(output.value, "value", output.value))
    return getattr(output, "value", output)


def embed_files_locally(listed: Sequence[tuple[str, int]], input_glob: str, handler: EncoderChunkHandler,
                        run_id: str, *, max_file_bytes: int, max_pixels: int, threads: int = 0
                        ) -> tuple[pa.Table, pa.Table]:
    """`build`'s steps for a list of image files, run in this process without a pipeline: for a few
    thousand files (a nightly delta), where starting a pipeline costs more than the work.

    listed: (path, size in bytes or -1) per file, each under `input_glob`'s prefix (its item id). The same
    DoFns as the pipeline read, decode, share the inference of identical bytes, embed and validate, so the
    rows are the pipeline's: returns (templates Table of templates_schema(dim), failures Table of
    FAILURES_SCHEMA), every file in one of them. The decoded images are held until all are hashed (as the
    pipeline's side input of shared contents), so memory grows with the number of files. The encoder is
    loaded once per process and kept (`inference.kept_encoder`).
    """
    decode = DecodeFn(handler.input_spec, max_pixels, run_id, threads=decode_threads(threads))
    chunks, by_content, failures = [], {}, []

    def take(output) -> None:
        output = _unwindowed(output)
        if not isinstance(output, beam.pvalue.TaggedOutput):
            chunks.append(output)
        elif output.tag == FAILURES_TAG:
            failures.append(output.value)
        else:  # CONTENTS_TAG
            sha256, item = output.value
            by_content.setdefault(sha256, []).append(item)

    decode.setup()
    try:
        decode.start_bundle()
        for path, size in listed:
            record = sources.read_file(path, bio.item_id_for(path, input_glob), max_file_bytes,
                                       None if size is None or size < 0 else int(size))
            if isinstance(record, sources.ReadFailure):
                failures.append(read_failure_row(record, run_id))
                continue
            for output in decode.process(record):
                take(output)
        for output in decode.finish_bundle():
            take(output)
    finally:
        decode.teardown()
    duplicates = dict(shared for element in by_content.items() for shared in shared_contents(element))
    first_copies = FirstCopiesFn(handler.input_spec)
    images = [image_chunk for chunk in chunks for image_chunk in first_copies.process(chunk, duplicates)]
    tables = []
    if images:
        model = kept_encoder(handler)  # the nightly service's nights load it once
        to_templates = ToTemplatesFn(handler.model_id, handler.embedding_dim, run_id)
        to_templates.setup()
        batch, weight = [], 0
        for k, image_chunk in enumerate(images):  # RunInference's batches: chunks up to batch_size images
            batch.append(image_chunk)
            weight += chunk_size(image_chunk)
            if weight < handler.batch_size and k + 1 < len(images):
                continue
            for result in handler.run_inference(batch, model):
                for output in to_templates.process(result):
                    if isinstance(output, beam.pvalue.TaggedOutput):
                        failures.append(output.value)
                    else:
                        tables.append(output)
            batch, weight = [], 0
    schema = templates_schema(handler.embedding_dim)
    templates = pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()
    return templates.sort_by("item_id"), bio.conform_table(failures, FAILURES_SCHEMA)


def _counters(result) -> dict:
    """The embed counters (COUNTERS) of a pipeline result ({} if the runner reports none)."""
    return runner.counters(result, COUNTERS)


def _progress_line(result) -> str:
    counts = _counters(result)
    return "embed " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("items_read", "decoded", "embedded", "failed"))


def lineage_of(opts: EmbedOptions, handler: EncoderChunkHandler, run_id: str) -> dict:
    """What every shard of this embed run records it was made from (beam_pipeline.outputs)."""
    return {"stage": "embed", "run_id": run_id, "model_id": handler.model_id, "input": opts.input,
            "input_spec": handler.input_spec}


class AllItemsFailed(ValueError):
    """Every item of the catalogue failed: nothing worth publishing (a user-facing refusal)."""


def failures_digest(failures: pa.Table, examples: int = 3) -> str:
    """'decode 10, read 3; e.g. a.png: DecodeError: ...': the stages and first reasons of a failures table."""
    stages: dict[str, int] = {}
    for stage in failures.column("stage").to_pylist():
        stages[stage] = stages.get(stage, 0) + 1
    rows = failures.select(["item_id", "error"]).slice(0, examples).to_pylist()
    shown = "; ".join(f"{r['item_id']}: {r['error'][:160]}" for r in rows)
    return ", ".join(f"{k} {v}" for k, v in sorted(stages.items())) + (f"; e.g. {shown}" if shown else "")


def _check_model(model_dir: str) -> None:
    """Load the encoder once in the driver (file hash, safe mode, dimension, model_id: siamese_core.artefact), so
    a wrong or tampered model is one clear error before any output is touched, not a worker traceback."""
    from siamese_core.artefact import load_encoder

    load_encoder(model_dir)


def read_input_list(path: str | None, input_glob: str) -> list[str] | None:
    """The paths of --input_list (one per line, blank lines skipped), each checked to lie under --input's
    prefix (its item id is relative to it); None without the flag."""
    if path is None:
        return None
    with FileSystems.open(path) as f:
        paths = [line.strip() for line in f.read().decode("utf-8").splitlines() if line.strip()]
    for p in paths:
        bio.item_id_for(p, input_glob)  # raises ValueError naming the path when it is outside the prefix
    return paths


def run(argv=None, test_pipeline=None) -> dict:
    """Run the embed pipeline; returns a summary of what was written.

    Returns {"templates": dir, "failures": dir, "items": n, "embedded": n, "failed": n,
    "inferences_saved": n, "seconds": s, "run_id": id, "model_id": id, "input_format": fmt,
    "counters": {...}, "moved_aside": [...]} (+ "labels": dir with --label_key). The tables are written
    into a staging directory and published into --output only when the run succeeded
    (beam_pipeline.outputs.StagedRun): a failed, refused or interrupted run leaves the previous outputs
    as they were. A run in which every item failed publishes nothing and raises AllItemsFailed, unless
    --allow_all_failed. Outputs of later stages made from other templates are moved aside
    (`moved_aside`). The counts are read back from the written tables; inferences_saved = templates rows
    that share their content (and so their embedding) with an earlier row. `counters` are the pipeline's
    Beam counters (COUNTERS). A Dataflow dry run (--dry_run) writes --dataflow_job_file when given and
    returns the same keys with zero counts plus "job_file".
    """
    pipeline_options, opts = parse_stage_options(
        argv, EmbedOptions, "Embed a catalogue of images into templates Parquet (Apache Beam).")
    run_id = opts.run_id or new_run_id()
    started = time.perf_counter()

    # A sample of the listing: enough to refuse an empty glob and tell the format; the pipeline lists it
    # all again, spread over workers.
    given = read_input_list(opts.input_list, opts.input)
    paths = given[:FORMAT_SAMPLE] if given is not None else \
        [listed.path for listed in sources.list_catalogue(opts.input, limit=FORMAT_SAMPLE)]
    if not paths:
        raise FileNotFoundError(f"--input {opts.input!r} matches no files" if given is None else
                                f"--input_list {opts.input_list} names no files")
    input_format = resolve_input_format(opts, paths)
    if given is not None and input_format != "files":
        raise ValueError(f"--input_list names image files; --input {opts.input!r} holds {input_format}")
    handler = EncoderChunkHandler(
        opts.model_dir, batch_size=opts.batch_size, share_across_processes=opts.share_model_across_processes)
    dry_run = runner.is_dry_run(pipeline_options)
    if not dry_run:
        _check_model(opts.model_dir)
    log.info("embed run %s: %s input %s with model %s (%s) -> %s", run_id, input_format, opts.input,
             handler.model_id, handler.input_spec, opts.output)

    summary = {
        "templates": FileSystems.join(opts.output, "templates"),
        "failures": FileSystems.join(opts.output, "failures"),
        "run_id": run_id,
        "model_id": handler.model_id,
        "input_format": input_format,
    }
    with outputs.StagedRun(opts.output, "embed", run_id) as staged:
        pipeline = runner.new_pipeline(pipeline_options, test_pipeline)
        build(pipeline, opts, handler, run_id, input_format, output_dir=staged.dir)
        result = runner.run(pipeline, pipeline_options, _progress_line)
        if dry_run:
            summary.update(items=0, embedded=0, failed=0, inferences_saved=0,
                           seconds=round(time.perf_counter() - started, 3), counters={},
                           job_file=pipeline_options.view_as(DebugOptions).dataflow_job_file)
            return summary
        counters = _counters(result)

        templates = bio.read_table_dir(staged.dir, "templates", handler.embedding_dim)
        failures = bio.read_table_dir(staged.dir, "failures")
        items = templates.num_rows + failures.num_rows
        if templates.num_rows == 0 and not opts.allow_all_failed:
            raise AllItemsFailed(
                f"every one of the {items} items of {opts.input!r} failed ({failures_digest(failures)}); nothing "
                f"was published and {opts.output} is as it was (--allow_all_failed publishes the failures)")
        fingerprint = outputs.templates_fingerprint(bio.table_glob(staged.dir, "templates"))
        staged.publish(outputs.downstream_of_templates(fingerprint["fingerprint"]))

    contents = len(set(templates.column("content_sha256").to_pylist()))
    summary.update(
        items=items,
        embedded=templates.num_rows,
        failed=failures.num_rows,
        inferences_saved=templates.num_rows - contents,
        seconds=round(time.perf_counter() - started, 3),
        counters=counters,
        fingerprint=fingerprint["fingerprint"],
        moved_aside=staged.moved_aside,
    )
    if opts.label_key is not None:
        summary["labels"] = FileSystems.join(opts.output, "labels")
    if counters.get("items_read") not in (None, summary["items"]):
        log.warning("embed: %s items were read but %d templates + failures were written",
                    counters["items_read"], summary["items"])
    log.info("embed run %s: %d items, %d embedded (%d inferences saved by identical bytes), %d failed in "
             "%.1f s", run_id, summary["items"], summary["embedded"], summary["inferences_saved"],
             summary["failed"], summary["seconds"])
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run()
