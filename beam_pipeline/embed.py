"""The embed pipeline: a catalogue in (image files, TFRecord, Parquet or tar shards; local or gs://),
templates (one embedding per item) and failures out.

    ReadCatalogue(--input)                     (spread by file / shard / row group)  --(read error)-----> failures
      -> decode to the card's input spec, key by content_sha256 of the bytes         --(decode error)---> failures
      -> CombinePerKey: one copy of the pixels + every item with those bytes
      -> RunInference(KeyedModelHandler(EncoderModelHandler))  (batched)             --(inference error)> failures
      -> one template row per item (embedding checked: finite, unit norm)            --(bad output)-----> failures
      -> [record formats: one template per item_id]                                  --(repeated id)----> failures
      -> OUTPUT/templates/templates-*.parquet    OUTPUT/failures/failures-*.parquet
         [OUTPUT/labels/labels-*.parquet with --label_key]

Every item read ends as exactly one templates row or one failures row. Byte-identical items are embedded
once and share the embedding (each keeps its own row); `inferences_saved` says how many model evaluations
that spared. The model card drives the decode (size, channels, value range), the embedding
dimension of the table and the `model_id` column: nothing is configured twice.

Runs locally by default, on the DirectRunner's engine (see `_apply_local_defaults`, `LOCAL_RUNNING_MODE`);
`--runner DataflowRunner` with `--setup_file ./setup.py` (or a worker image, docs/gpu_worker.md) runs the
same code on Dataflow.

    python -m beam_pipeline.embed --input 'catalogue/images/*.png' --model_dir model --output out
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import time
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference
from apache_beam.options.pipeline_options import DebugOptions, DirectOptions, StandardOptions, TestOptions

from beam_pipeline import io as bio
from beam_pipeline import sources
from beam_pipeline.decode import DecodeError, decode_image
from beam_pipeline.inference import EncoderModelHandler, InferenceFailure, keyed_handler
from beam_pipeline.options import EmbedOptions, new_run_id, parse_stage_options
from schemas.tables import FAILURES_SCHEMA, templates_schema

log = logging.getLogger(__name__)

NAMESPACE = sources.METRICS_NAMESPACE
FAILURES_TAG = sources.FAILURES_TAG
# Same tolerance as schemas.validate_table: a row the reader would refuse goes to failures instead.
UNIT_NORM_TOLERANCE = 1e-3
PROGRESS_EVERY = 2000
PROGRESS_SECONDS = 30.0
COUNTERS = ("items_read", "read_failed", "decoded", "decode_failed", "inferences", "inferences_saved",
            "embedded", "failed")
# Local runs: how the DirectRunner executes when --direct_running_mode is not given. Measured on the
# 2-core reference machine (BENCHMARKS.md, "Embed pipeline"): see bench/bench_embed.py --modes.
LOCAL_RUNNING_MODE = "in_memory"

LABELS_SCHEMA = pa.schema([
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
])


class ItemRef(NamedTuple):
    """One catalogue item that has a given content."""

    item_id: str
    source_uri: str


class ContentInfo(NamedTuple):
    """What travels with a distinct content's pixels through inference (the RunInference key).

    items: every item with these bytes, sorted; width, height: the image's size as displayed.
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


def template_row(item: ItemRef, info: ContentInfo, embedding: np.ndarray, model_id: str, run_id: str,
                 embedded_at: datetime.datetime) -> dict:
    """A templates-table row for `item`, whose content is `info`, with its float32 (dim,) `embedding`."""
    return {
        "item_id": item.item_id,
        "source_uri": item.source_uri,
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


class DecodeFn(beam.DoFn):
    """Record -> (sha256 hex of its bytes, ((pixel bytes, width, height), (item_id, source_uri)));
    undecodable -> failures row ('decode').

    Decoding comes before identical bytes are brought together, so what crosses that shuffle is the
    model-sized pixels (28x28 bytes for the default encoder), not files of any size: a local run keeps
    what goes through a shuffle in memory. Plain bytes, ints and strings, because Beam encodes them
    without pickling.
    """

    def __init__(self, input_spec: dict, max_pixels: int, run_id: str):
        self._input_spec = dict(input_spec)
        self._max_pixels = max_pixels
        self._run_id = run_id
        self._decoded = Metrics.counter(NAMESPACE, "decoded")
        self._decode_failed = Metrics.counter(NAMESPACE, "decode_failed")
        self._failed = Metrics.counter(NAMESPACE, "failed")

    def process(self, record: sources.Record):
        try:
            decoded = decode_image(record.data, self._input_spec, self._max_pixels)
        except Exception as err:  # DecodeError, or a decoder bug: the item fails, the pipeline does not
            if not isinstance(err, DecodeError):
                log.warning("decode: unexpected %s on %s", type(err).__name__, record.source_uri)
            self._decode_failed.inc()
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(
                FAILURES_TAG, failure_row(record.item_id, record.source_uri, "decode", err, self._run_id))
            return
        self._decoded.inc()
        yield (hashlib.sha256(record.data).hexdigest(),
               ((decoded.pixels.tobytes(), decoded.width, decoded.height), (record.item_id, record.source_uri)))


class GatherContentFn(beam.CombineFn):
    """Combines the (pixels, item) values of one content hash into (pixels, sorted tuple of items):
    identical bytes decode to identical pixels, so one copy is kept, and with combiner lifting a
    duplicate's pixels do not even cross the shuffle. Accumulator: [pixels or None, list of items].
    """

    def create_accumulator(self):
        return [None, []]

    def add_input(self, accumulator, element):
        pixels, item = element
        if accumulator[0] is None:
            accumulator[0] = pixels
        accumulator[1].append(item)
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = [None, []]
        for pixels, items in accumulators:
            if merged[0] is None:
                merged[0] = pixels
            merged[1].extend(items)
        return merged

    def extract_output(self, accumulator):
        return accumulator[0], tuple(sorted(accumulator[1]))


def inference_input(element, input_spec: dict) -> tuple[ContentInfo, np.ndarray]:
    """(sha256, ((pixel bytes, width, height), items)) -> (ContentInfo, uint8 pixels (H, W, C) of the
    input spec): RunInference's (key, example)."""
    sha256, ((data, width, height), items) = element
    shape = (int(input_spec["height"]), int(input_spec["width"]), int(input_spec["channels"]))
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    return ContentInfo(sha256, tuple(ItemRef(*item) for item in items), width, height), pixels


class ToTemplateFn(beam.DoFn):
    """(ContentInfo, PredictionResult) -> one template row per item; failed or invalid embeddings -> one
    failures row per item. Logs a progress line every PROGRESS_EVERY rows or PROGRESS_SECONDS."""

    def __init__(self, model_id: str, dim: int, run_id: str):
        self._model_id = model_id
        self._dim = dim
        self._run_id = run_id
        self._embedded = Metrics.counter(NAMESPACE, "embedded")
        self._inferences = Metrics.counter(NAMESPACE, "inferences")
        self._saved = Metrics.counter(NAMESPACE, "inferences_saved")
        self._failed = Metrics.counter(NAMESPACE, "failed")

    def setup(self):
        self._count = 0
        self._started = self._last_log = time.perf_counter()

    def _fail(self, info: ContentInfo, stage: str, error: str):
        self._failed.inc(len(info.items))
        for item in info.items:
            yield beam.pvalue.TaggedOutput(
                FAILURES_TAG, failure_row(item.item_id, item.source_uri, stage, error, self._run_id))

    def process(self, element):
        info, result = element
        inference = result.inference
        if isinstance(inference, InferenceFailure):
            yield from self._fail(info, "inference", inference.error)
            return
        problem = check_embedding(inference, self._dim)
        if problem is not None:
            yield from self._fail(info, "validate", problem)
            return
        n = len(info.items)
        self._embedded.inc(n)
        self._inferences.inc()
        self._saved.inc(n - 1)
        now = datetime.datetime.now(datetime.timezone.utc)
        for item in info.items:
            yield template_row(item, info, inference, self._model_id, self._run_id, now)
        self._progress(n)

    def _progress(self, n: int) -> None:
        before, self._count = self._count, self._count + n
        clock = time.perf_counter()
        if self._count // PROGRESS_EVERY > before // PROGRESS_EVERY or clock - self._last_log > PROGRESS_SECONDS:
            self._last_log = clock
            log.info("embed progress: %d items embedded by this worker (%.0f items/s)", self._count,
                     self._count / max(clock - self._started, 1e-9))


def uri_order(source_uri: str) -> tuple:
    """Sort key of source URIs that orders '<shard>#<position>' by shard, then position as a number."""
    shard, _, position = source_uri.rpartition("#")
    return (shard, 0, int(position), "") if position.isdigit() else (shard, 1, 0, position)


class UniqueIdsFn(beam.DoFn):
    """(item_id, template rows) -> the row read first (`uri_order`); any other row of that id becomes
    a failures row ('validate'): ids read from shards may repeat, and the templates table's may not."""

    def __init__(self, run_id: str):
        self._run_id = run_id
        self._embedded = Metrics.counter(NAMESPACE, "embedded")
        self._failed = Metrics.counter(NAMESPACE, "failed")

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


def build(pipeline: beam.Pipeline, opts: EmbedOptions, handler: EncoderModelHandler, run_id: str,
          input_format: str = "files") -> None:
    """Add the embed transforms to `pipeline`: `opts.input` -> templates and failures under `opts.output`."""
    keys = sources.RecordKeys(image=opts.image_key, id=opts.id_key, label=opts.label_key)
    records, read_failures = pipeline | "Read" >> sources.ReadCatalogue(
        opts.input, input_format, keys, opts.max_file_bytes)
    decoded = records | "Decode" >> beam.ParDo(
        DecodeFn(handler.input_spec, opts.max_pixels, run_id)).with_outputs(FAILURES_TAG, main="ok")
    contents = (decoded.ok
                | "GatherDuplicates" >> beam.CombinePerKey(GatherContentFn())
                | "ToModelInput" >> beam.Map(inference_input, handler.input_spec))
    predictions = contents | "Embed" >> RunInference(keyed_handler(handler))
    rows = predictions | "ToTemplates" >> beam.ParDo(
        ToTemplateFn(handler.model_id, handler.embedding_dim, run_id)).with_outputs(FAILURES_TAG, main="ok")
    templates = rows.ok
    failures = [read_failures | "ReadFailureRows" >> beam.Map(read_failure_row, run_id),
                decoded[FAILURES_TAG], rows[FAILURES_TAG]]
    if input_format != "files":  # file paths are unique ids; ids read from records may repeat
        unique = (templates
                  | "KeyById" >> beam.Map(lambda row: (row["item_id"], row))
                  | "GroupById" >> beam.GroupByKey()
                  | "UniqueIds" >> beam.ParDo(UniqueIdsFn(run_id)).with_outputs(FAILURES_TAG, main="ok"))
        templates = unique.ok
        failures.append(unique[FAILURES_TAG])

    _ = templates | "WriteTemplates" >> bio.WriteTable(
        opts.output, "templates", templates_schema(handler.embedding_dim), num_shards=opts.num_shards,
        row_group_rows=opts.row_group_rows)
    # Written even when empty (one empty shard), so readers always find the table.
    _ = (tuple(failures) | "AllFailures" >> beam.Flatten()
         | "WriteFailures" >> bio.WriteTable(opts.output, "failures", FAILURES_SCHEMA, num_shards=opts.num_shards))
    if opts.label_key is not None:
        _ = (records
             | "Labelled" >> beam.Filter(lambda r: r.label is not None)
             | "LabelRows" >> beam.Map(lambda r, run: {"item_id": r.item_id, "source_uri": r.source_uri,
                                                       "label": r.label, "run_id": run}, run_id)
             | "WriteLabels" >> bio.WriteTable(opts.output, "labels", LABELS_SCHEMA, num_shards=opts.num_shards))


def _counters(result) -> dict:
    """The embed counters (COUNTERS) of a pipeline result ({} if the runner reports none)."""
    try:
        query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(NAMESPACE))
    except Exception:  # some runners do not support metrics queries
        return {}
    counts = dict.fromkeys(COUNTERS, 0)
    for counter in query["counters"]:
        name = counter.key.metric.name
        value = counter.committed if counter.committed is not None else counter.attempted
        counts[name] = counts.get(name, 0) + int(value or 0)
    return counts


def _progress_line(counts: dict) -> str:
    return ", ".join(f"{k} {counts.get(k, 0)}" for k in ("items_read", "decoded", "embedded", "failed"))


def _wait(result, poll_seconds: float = PROGRESS_SECONDS) -> None:
    """Wait for the pipeline, logging a progress line of its counters while it runs (runners that return
    before finishing: Dataflow; the DirectRunner has finished when run() returns)."""
    state = result.state
    while not beam.runners.runner.PipelineState.is_terminal(state):
        state = result.wait_until_finish(duration=int(poll_seconds * 1000))
        if not beam.runners.runner.PipelineState.is_terminal(state or result.state):
            log.info("embed progress: %s", _progress_line(_counters(result)))
        state = state or result.state
    result.wait_until_finish()


def _apply_local_defaults(pipeline_options) -> None:
    """Local runs: pin Beam's FnApiRunner when no --runner is given, in LOCAL_RUNNING_MODE unless
    --direct_running_mode is given.

    The FnApiRunner is the engine the DirectRunner runs batch pipelines on. Named directly because
    Beam 2.77's DirectRunner first tries the Prism runner, a binary it downloads from GitHub: offline
    that fails and it falls back to the FnApiRunner, online the pipeline would run on another engine
    that ignores --direct_running_mode. `--runner DirectRunner` still gets Beam's own choice.
    """
    standard = pipeline_options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = "FnApiRunner"
    if standard.runner not in ("FnApiRunner", "DirectRunner", "direct"):
        return
    explicit = pipeline_options.get_all_options(drop_default=True)
    if "direct_running_mode" not in explicit:
        pipeline_options.view_as(DirectOptions).direct_running_mode = LOCAL_RUNNING_MODE


def describe_dataflow_job(job) -> dict:
    """The Dataflow job description (the CreateJob request body) of a dry-run job, built offline.

    Beam's dry run returns before `create_job`, which stages the artefacts to GCS and only then writes
    --dataflow_job_file; this fills in the same worker environment (worker pool, container image,
    experiments, service options, packages to stage, sdkPipelineOptions) without uploading anything, so
    the file shows what Dataflow would receive.
    """
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2
    from apache_beam.runners.dataflow.internal import apiclient
    from apache_beam.runners.internal import names as shared_names

    staging = job.options.view_as(beam.options.pipeline_options.GoogleCloudOptions).staging_location
    packages, local_files = [], {}
    for _, env in sorted(job.proto_pipeline.components.environments.items()):
        for dep in env.dependencies:
            if dep.role_urn == common_urns.artifact_roles.STAGING_TO.urn:
                name = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload).staged_name
                if name not in packages:
                    packages.append(name)
                    if dep.type_urn == common_urns.artifact_types.FILE.urn:
                        local_files[name] = beam_runner_api_pb2.ArtifactFilePayload.FromString(dep.type_payload).path
    serialized = job.proto_pipeline.SerializeToString()
    job.proto.environment = apiclient.Environment(
        packages=packages,
        options=job.options,
        environment_version=apiclient._FNAPI_ENVIRONMENT_MAJOR_VERSION,
        proto_pipeline_staged_url=FileSystems.join(staging, shared_names.STAGED_PIPELINE_FILENAME),
        proto_pipeline=job.proto_pipeline,
        pipeline_proto_hash=hashlib.sha256(serialized).hexdigest(),
    ).proto
    description = json.loads(job.json())
    description["siamese_dedup"] = {
        "note": "dry run: built offline, nothing staged or submitted",
        # Where the files to stage were built on this machine (e.g. workflow.tar.gz, setup.py's sdist).
        "local_files": local_files,
        "transforms": sorted(t.unique_name for t in job.proto_pipeline.components.transforms.values()
                             if t.unique_name and "/" not in t.unique_name),
    }
    return description


def run(argv=None, test_pipeline=None) -> dict:
    """Run the embed pipeline; returns a summary of what was written.

    Returns {"templates": dir, "failures": dir, "items": n, "embedded": n, "failed": n,
    "inferences_saved": n, "seconds": s, "run_id": id, "model_id": id, "input_format": fmt,
    "counters": {...}} (+ "labels": dir with --label_key). The counts are read back from the written
    tables; inferences_saved = templates rows that share their content (and so their embedding) with an
    earlier row. `counters` are the pipeline's Beam counters (COUNTERS). A Dataflow dry run (--dry_run)
    writes --dataflow_job_file when given and returns the same keys with zero counts plus "job_file".
    """
    pipeline_options, opts = parse_stage_options(
        argv, EmbedOptions, "Embed a catalogue of images into templates Parquet (Apache Beam).")
    run_id = opts.run_id or new_run_id()
    started = time.perf_counter()

    paths = bio.match_paths(opts.input)
    if not paths:
        raise FileNotFoundError(f"--input {opts.input!r} matches no files")
    input_format = resolve_input_format(opts, paths)
    handler = EncoderModelHandler(
        opts.model_dir,
        min_batch_size=opts.min_batch_size,
        max_batch_size=opts.batch_size,
        share_across_processes=opts.share_model_across_processes,
    )
    dry_run = bool(pipeline_options.view_as(TestOptions).dry_run)
    log.info("embed run %s: %d %s input(s) %s with model %s (%s) -> %s", run_id, len(paths), input_format,
             opts.input, handler.model_id, handler.input_spec, opts.output)
    if not dry_run:
        # Shards of an earlier run would match the tables' globs beside the new ones.
        for name in ("templates", "failures", "labels"):
            bio.delete_table_shards(opts.output, name)

    if test_pipeline is None:
        _apply_local_defaults(pipeline_options)
    pipeline = test_pipeline if test_pipeline is not None else beam.Pipeline(options=pipeline_options)
    build(pipeline, opts, handler, run_id, input_format)
    result = pipeline.run()
    summary = {
        "templates": FileSystems.join(opts.output, "templates"),
        "failures": FileSystems.join(opts.output, "failures"),
        "run_id": run_id,
        "model_id": handler.model_id,
        "input_format": input_format,
    }
    if dry_run:
        job_file = pipeline_options.view_as(DebugOptions).dataflow_job_file
        job = getattr(result, "job", None)
        if job_file and job is not None:
            bio.write_json(job_file, describe_dataflow_job(job))
        summary.update(items=0, embedded=0, failed=0, inferences_saved=0,
                       seconds=round(time.perf_counter() - started, 3), counters={}, job_file=job_file)
        return summary
    _wait(result)
    counters = _counters(result)

    templates = bio.read_table_dir(opts.output, "templates", handler.embedding_dim)
    failures = bio.read_table_dir(opts.output, "failures")
    contents = len(set(templates.column("content_sha256").to_pylist()))
    summary.update(
        items=templates.num_rows + failures.num_rows,
        embedded=templates.num_rows,
        failed=failures.num_rows,
        inferences_saved=templates.num_rows - contents,
        seconds=round(time.perf_counter() - started, 3),
        counters=counters,
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
