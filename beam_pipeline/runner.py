"""Runner plumbing every Beam stage shares: which runner a local run gets, running and waiting for a
result, the stages' metrics and the Dataflow job description of a dry run.

Every stage builds its pipeline with `new_pipeline(pipeline_options, test_pipeline)`, runs it with
`run(pipeline, pipeline_options, progress)` and reads its counters with `counters(result, names)`, so a
local run of embed, match, dedup or watch executes the same way: on Beam's FnApiRunner (the engine the
DirectRunner runs batch pipelines on), never on a runner fetched at run time. Their DoFns make their
metrics with `counter(name)` / `distribution(name)`, all in METRICS_NAMESPACE.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Callable, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import DebugOptions, DirectOptions, StandardOptions, TestOptions

from beam_pipeline import io as bio

log = logging.getLogger(__name__)

# The one namespace of every stage's metrics (counter names say what they count; a pipeline is one stage).
METRICS_NAMESPACE = "siamese_dedup"

# Local runs: how the DirectRunner's engine executes when --direct_running_mode is not given. Measured on
# the 2-core reference machine (BENCHMARKS.md, "Embed pipeline"): see bench/bench_embed.py --modes.
LOCAL_RUNNING_MODE = "in_memory"
LOCAL_RUNNER = "FnApiRunner"
# The names under which a user asks for a local run.
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "direct")
PROGRESS_SECONDS = 30.0


def apply_local_defaults(pipeline_options) -> None:
    """Local runs: pin Beam's FnApiRunner when no --runner is given, in LOCAL_RUNNING_MODE unless
    --direct_running_mode is given.

    Named directly because Beam 2.77's DirectRunner first tries the Prism runner, a binary it downloads
    from GitHub at run time: offline that fails and it falls back to the FnApiRunner; online the pipeline
    would fetch and run a binary on another engine, which ignores --direct_running_mode. `--runner
    DirectRunner` still gets Beam's own choice.
    """
    standard = pipeline_options.view_as(StandardOptions)
    if standard.runner is None:
        standard.runner = LOCAL_RUNNER
    if standard.runner not in LOCAL_RUNNERS:
        return
    explicit = pipeline_options.get_all_options(drop_default=True)
    if "direct_running_mode" not in explicit:
        pipeline_options.view_as(DirectOptions).direct_running_mode = LOCAL_RUNNING_MODE


def counter(name: str):
    """A Beam counter `name` in METRICS_NAMESPACE (made in a DoFn's __init__)."""
    return Metrics.counter(METRICS_NAMESPACE, name)


def distribution(name: str):
    """A Beam distribution `name` in METRICS_NAMESPACE (made in a DoFn's __init__)."""
    return Metrics.distribution(METRICS_NAMESPACE, name)


def new_pipeline(pipeline_options, test_pipeline=None) -> beam.Pipeline:
    """`test_pipeline` when given (tests bring their own), else a pipeline on `pipeline_options` with the
    local defaults applied (`apply_local_defaults`)."""
    if test_pipeline is not None:
        return test_pipeline
    apply_local_defaults(pipeline_options)
    return beam.Pipeline(options=pipeline_options)


def wait(result, progress: Optional[Callable[[object], str]] = None,
         poll_seconds: float = PROGRESS_SECONDS) -> None:
    """Wait for the pipeline `result`; while it runs (runners that return before finishing: Dataflow;
    the local engine has finished when run() returns), log `progress(result)` every `poll_seconds`."""
    terminal = beam.runners.runner.PipelineState.is_terminal
    state = result.state
    while not terminal(state):
        state = result.wait_until_finish(duration=int(poll_seconds * 1000))
        if progress is not None and not terminal(state or result.state):
            log.info("progress: %s", progress(result))
        state = state or result.state
    result.wait_until_finish()


def is_dry_run(pipeline_options) -> bool:
    """--dry_run: the runner builds the job and submits nothing (Dataflow)."""
    return bool(pipeline_options.view_as(TestOptions).dry_run)


def run(pipeline: beam.Pipeline, pipeline_options, progress: Optional[Callable[[object], str]] = None):
    """Run `pipeline` and wait for it (`wait`, logging `progress(result)` while a remote job runs); returns
    its result. A dry run (--dry_run) submits nothing and is not waited for: the job description goes to
    --dataflow_job_file when given (`describe_dataflow_job`)."""
    result = pipeline.run()
    if is_dry_run(pipeline_options):
        job_file = pipeline_options.view_as(DebugOptions).dataflow_job_file
        job = getattr(result, "job", None)
        if job_file and job is not None:
            bio.write_json(job_file, describe_dataflow_job(job))
        return result
    wait(result, progress)
    return result


def _metrics(result, kind: str, name: str | None = None) -> list:
    """The `kind` ("counters", "distributions") metric results of METRICS_NAMESPACE (only `name` when
    given); None when the runner reports no metrics."""
    metrics_filter = beam.metrics.MetricsFilter().with_namespace(METRICS_NAMESPACE)
    if name is not None:
        metrics_filter = metrics_filter.with_name(name)
    try:
        return result.metrics().query(metrics_filter)[kind]
    except Exception:  # some runners do not support metrics queries
        return None


def counters(result, names=()) -> dict:
    """{counter name: value} of a pipeline result: every counter of METRICS_NAMESPACE, or only `names`
    when given (each present, 0 when the pipeline never incremented it); {} when the runner reports no
    metrics."""
    query = _metrics(result, "counters")
    if query is None:
        return {}
    counts = dict.fromkeys(names, 0)
    for metric in query:
        name = metric.key.metric.name
        if names and name not in counts:
            continue
        value = metric.committed if metric.committed is not None else metric.attempted
        counts[name] = counts.get(name, 0) + int(value or 0)
    return counts


def distribution_of(result, name: str) -> dict | None:
    """{"max", "mean", "count"} of distribution `name` in a pipeline result; None when not reported."""
    query = _metrics(result, "distributions", name)
    if not query:
        return None
    value = query[0].committed or query[0].attempted
    return None if value is None else {"max": value.max, "mean": value.mean, "count": value.count}


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
