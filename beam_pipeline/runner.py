"""Runner plumbing every Beam stage shares: which runner a local run gets, and waiting for a result.

Every stage builds its pipeline with `new_pipeline(pipeline_options, test_pipeline)` and waits with
`wait(result, progress)`, so a local run of embed, match or dedup executes the same way: on Beam's
FnApiRunner (the engine the DirectRunner runs batch pipelines on), never on a runner fetched at run time.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

log = logging.getLogger(__name__)

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


def counters(result, namespace: str, names=()) -> dict:
    """{counter name: value} of `namespace` in a pipeline result (each of `names` present, 0 when the
    pipeline never incremented it; {} when the runner reports no metrics)."""
    try:
        query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(namespace))
    except Exception:  # some runners do not support metrics queries
        return {}
    counts = dict.fromkeys(names, 0)
    for counter in query["counters"]:
        value = counter.committed if counter.committed is not None else counter.attempted
        counts[counter.key.metric.name] = counts.get(counter.key.metric.name, 0) + int(value or 0)
    return counts
