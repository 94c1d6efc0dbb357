"""The embed pipeline: image files in, templates (one embedding per item) and failures out.

    MatchFiles(--input) -> Reshuffle -> ReadMatches -> read bytes      --(read error)-----> failures
      -> content_sha256 -> decode to the card's input spec             --(decode error)---> failures
      -> RunInference(KeyedModelHandler(EncoderModelHandler))          --(inference error)> failures
      -> template rows (embedding checked: finite, unit norm)          --(bad output)-----> failures
      -> OUTPUT/templates/templates-*.parquet    OUTPUT/failures/failures-*.parquet

Every matched file ends as exactly one templates row or one failures row. The model card drives the
decode (size, channels, value range), the embedding dimension of the table and the `model_id` column:
nothing is configured twice. Runs on the DirectRunner by default; `--runner DataflowRunner` with
`--setup_file ./setup.py` runs the same code on Dataflow.

    python -m beam_pipeline.embed --input 'catalogue/images/*.png' --model_dir model --output out
"""
from __future__ import annotations

import datetime
import hashlib
import logging
import time
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference

from beam_pipeline import io as bio
from beam_pipeline.decode import DecodeError, decode_image
from beam_pipeline.inference import EncoderModelHandler, InferenceFailure, keyed_handler
from beam_pipeline.options import EmbedOptions, new_run_id, parse_stage_options
from schemas.tables import FAILURES_SCHEMA, templates_schema

log = logging.getLogger(__name__)

NAMESPACE = "embed"
FAILURES_TAG = "failures"
# Same tolerance as schemas.validate_table: a row the reader would refuse goes to failures instead.
UNIT_NORM_TOLERANCE = 1e-3
PROGRESS_EVERY = 1000
COUNTERS = ("items_read", "decoded", "embedded", "failed")


class ItemInfo(NamedTuple):
    """What travels with an item's pixels through inference (the RunInference key)."""

    item_id: str
    source_uri: str
    content_sha256: str
    width: int
    height: int


def failure_row(item_id: str, source_uri: str, stage: str, error, run_id: str) -> dict:
    """A failures-table row; `error` is an exception (written as 'Type: message') or a string."""
    if isinstance(error, BaseException):
        error = f"{type(error).__name__}: {error}"
    return {"item_id": item_id, "source_uri": source_uri, "stage": stage, "error": str(error)[:2000],
            "run_id": run_id}


def template_row(info: ItemInfo, embedding: np.ndarray, model_id: str, run_id: str,
                 embedded_at: datetime.datetime) -> dict:
    """A templates-table row for `info` with its float32 (dim,) `embedding`."""
    return {
        "item_id": info.item_id,
        "source_uri": info.source_uri,
        "content_sha256": info.content_sha256,
        "embedding": np.asarray(embedding, dtype=np.float32),
        "model_id": model_id,
        "width": int(info.width),
        "height": int(info.height),
        "embedded_at": embedded_at,
        "run_id": run_id,
    }


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


class ReadFileFn(beam.DoFn):
    """ReadableFile -> (item_id, source_uri, bytes); unreadable or oversized files -> failures ('read')."""

    def __init__(self, input_glob: str, max_file_bytes: int, run_id: str):
        self._input_glob = input_glob
        self._max_file_bytes = max_file_bytes
        self._run_id = run_id
        self._items_read = Metrics.counter(NAMESPACE, "items_read")
        self._failed = Metrics.counter(NAMESPACE, "failed")

    def process(self, readable_file):
        uri = readable_file.metadata.path
        item_id = bio.item_id_for(uri, self._input_glob)
        self._items_read.inc()
        try:
            size = readable_file.metadata.size_in_bytes
            if self._max_file_bytes and size is not None and size > self._max_file_bytes:
                raise OSError(f"file of {size} bytes exceeds --max_file_bytes={self._max_file_bytes}")
            # UNCOMPRESSED: the bytes of 'x.png.gz' are the file's bytes, not a gunzipped stream.
            with readable_file.open(compression_type=CompressionTypes.UNCOMPRESSED) as f:
                data = f.read()
        except Exception as err:  # filesystems raise their own IOError subclasses
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES_TAG, failure_row(item_id, uri, "read", err, self._run_id))
            return
        yield item_id, uri, data


class DecodeFn(beam.DoFn):
    """(item_id, uri, bytes) -> (ItemInfo, uint8 pixels (H, W, C)); undecodable -> failures ('decode')."""

    def __init__(self, input_spec: dict, max_pixels: int, run_id: str):
        self._input_spec = dict(input_spec)
        self._max_pixels = max_pixels
        self._run_id = run_id
        self._decoded = Metrics.counter(NAMESPACE, "decoded")
        self._failed = Metrics.counter(NAMESPACE, "failed")

    def process(self, element):
        item_id, uri, data = element
        sha256 = hashlib.sha256(data).hexdigest()
        try:
            decoded = decode_image(data, self._input_spec, self._max_pixels)
        except DecodeError as err:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(FAILURES_TAG, failure_row(item_id, uri, "decode", err, self._run_id))
            return
        self._decoded.inc()
        yield ItemInfo(item_id, uri, sha256, decoded.width, decoded.height), decoded.pixels


class ToTemplateFn(beam.DoFn):
    """(ItemInfo, PredictionResult) -> template row; failed or invalid embeddings -> failures."""

    def __init__(self, model_id: str, dim: int, run_id: str):
        self._model_id = model_id
        self._dim = dim
        self._run_id = run_id
        self._embedded = Metrics.counter(NAMESPACE, "embedded")
        self._failed = Metrics.counter(NAMESPACE, "failed")

    def setup(self):
        self._count = 0
        self._started = time.perf_counter()

    def process(self, element):
        info, result = element
        inference = result.inference
        if isinstance(inference, InferenceFailure):
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(
                FAILURES_TAG, failure_row(info.item_id, info.source_uri, "inference", inference.error, self._run_id))
            return
        problem = check_embedding(inference, self._dim)
        if problem is not None:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(
                FAILURES_TAG, failure_row(info.item_id, info.source_uri, "validate", problem, self._run_id))
            return
        self._embedded.inc()
        self._count += 1
        if self._count % PROGRESS_EVERY == 0:
            elapsed = time.perf_counter() - self._started
            log.info("embed: %d items embedded by this worker (%.1f items/s)", self._count, self._count / elapsed)
        now = datetime.datetime.now(datetime.timezone.utc)
        yield template_row(info, inference, self._model_id, self._run_id, now)


def build(pipeline: beam.Pipeline, opts: EmbedOptions, handler: EncoderModelHandler, run_id: str) -> None:
    """Add the embed transforms to `pipeline`: `opts.input` -> templates and failures under `opts.output`."""
    files = (
        pipeline
        | "MatchFiles" >> fileio.MatchFiles(opts.input)
        # Matching yields all paths from one worker: spread the reads.
        | "SpreadReads" >> beam.Reshuffle()
        | "ReadMatches" >> fileio.ReadMatches()
    )
    read = files | "ReadBytes" >> beam.ParDo(
        ReadFileFn(opts.input, opts.max_file_bytes, run_id)).with_outputs(FAILURES_TAG, main="ok")
    decoded = read.ok | "Decode" >> beam.ParDo(
        DecodeFn(handler.input_spec, opts.max_pixels, run_id)).with_outputs(FAILURES_TAG, main="ok")
    predictions = decoded.ok | "Embed" >> RunInference(keyed_handler(handler))
    rows = predictions | "ToTemplates" >> beam.ParDo(
        ToTemplateFn(handler.model_id, handler.embedding_dim, run_id)).with_outputs(FAILURES_TAG, main="ok")

    _ = rows.ok | "WriteTemplates" >> bio.WriteTable(
        opts.output, "templates", templates_schema(handler.embedding_dim), num_shards=opts.num_shards)
    failures = (read.failures, decoded.failures, rows.failures) | "AllFailures" >> beam.Flatten()
    # Written even when empty (one empty shard), so readers always find the table.
    _ = failures | "WriteFailures" >> bio.WriteTable(opts.output, "failures", FAILURES_SCHEMA, num_shards=opts.num_shards)


def _counters(result) -> dict:
    """The embed counters (COUNTERS) of a finished pipeline result ({} if the runner reports none)."""
    try:
        query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
    except Exception:  # some runners do not support metrics queries
        return {}
    counts = dict.fromkeys(COUNTERS, 0)
    for counter in query["counters"]:
        name = counter.key.metric.name
        counts[name] = counts.get(name, 0) + int(counter.committed or counter.attempted or 0)
    return counts


def run(argv=None, test_pipeline=None) -> dict:
    """Run the embed pipeline; returns a summary of what was written.

    Returns {"templates": dir, "failures": dir, "items": n, "embedded": n, "failed": n,
    "seconds": s, "run_id": id, "model_id": id, "counters": {...}}; the counts are read back from the
    written tables.
    """
    pipeline_options, opts = parse_stage_options(
        argv, EmbedOptions, "Embed a catalogue of images into templates Parquet (Apache Beam).")
    run_id = opts.run_id or new_run_id()
    started = time.perf_counter()

    if not bio.match_paths(opts.input):
        raise FileNotFoundError(f"--input {opts.input!r} matches no files")
    handler = EncoderModelHandler(
        opts.model_dir,
        min_batch_size=opts.min_batch_size,
        max_batch_size=opts.batch_size,
        share_across_processes=opts.share_model_across_processes,
    )
    log.info("embed run %s: %s with model %s (%s) -> %s", run_id, opts.input, handler.model_id,
             handler.input_spec, opts.output)
    # Shards of an earlier run would match the tables' globs beside the new ones.
    for name in ("templates", "failures"):
        bio.delete_table_shards(opts.output, name)

    pipeline = test_pipeline if test_pipeline is not None else beam.Pipeline(options=pipeline_options)
    build(pipeline, opts, handler, run_id)
    result = pipeline.run()
    result.wait_until_finish()
    counters = _counters(result)

    templates = bio.read_table_dir(opts.output, "templates", handler.embedding_dim)
    failures = bio.read_table_dir(opts.output, "failures")
    summary = {
        "templates": FileSystems.join(opts.output, "templates"),
        "failures": FileSystems.join(opts.output, "failures"),
        "items": templates.num_rows + failures.num_rows,
        "embedded": templates.num_rows,
        "failed": failures.num_rows,
        "seconds": round(time.perf_counter() - started, 3),
        "run_id": run_id,
        "model_id": handler.model_id,
        "counters": counters,
    }
    if counters.get("items_read") not in (None, summary["items"]):
        log.warning("embed: %s files were read but %d templates + failures were written",
                    counters["items_read"], summary["items"])
    log.info("embed run %s: %d items, %d embedded, %d failed in %.1f s", run_id, summary["items"],
             summary["embedded"], summary["failed"], summary["seconds"])
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run()
