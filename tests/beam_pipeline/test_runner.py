"""Runner plumbing shared by the Beam stages: every local run is pinned to the FnApiRunner, progress while
a remote job runs."""
import logging
from types import SimpleNamespace

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState

from beam_pipeline import embed, runner


def _applied(argv):
    options = PipelineOptions(argv)
    runner.apply_local_defaults(options)
    return options.view_as(StandardOptions).runner, options.view_as(DirectOptions).direct_running_mode


def test_local_runner_defaults():
    assert _applied([]) == ("FnApiRunner", runner.LOCAL_RUNNING_MODE)
    assert _applied(["--direct_running_mode", "multi_processing"]) == ("FnApiRunner", "multi_processing")
    assert _applied(["--runner", "DirectRunner"]) == ("DirectRunner", runner.LOCAL_RUNNING_MODE)
    assert _applied(["--runner", "DataflowRunner"])[0] == "DataflowRunner"


def test_new_pipeline_pins_the_runner():
    options = PipelineOptions([])
    pipeline = runner.new_pipeline(options)
    assert options.view_as(StandardOptions).runner == "FnApiRunner"
    assert pipeline is not None


def test_wait_logs_progress_while_a_remote_job_runs(caplog):
    """Runners whose run() returns at once (Dataflow): a progress line of the counters per poll."""

    class FakeResult:
        def __init__(self):
            self.states = [PipelineState.RUNNING, PipelineState.RUNNING, PipelineState.DONE]
            self.state = PipelineState.RUNNING
            self.polls = []

        def wait_until_finish(self, duration=None):
            self.polls.append(duration)
            if duration is None:
                return self.state
            self.state = self.states.pop(0)
            return self.state

        def metrics(self):
            done = len(self.polls)
            counter = lambda name, v: SimpleNamespace(key=SimpleNamespace(metric=SimpleNamespace(name=name)),
                                                      committed=v, attempted=v)
            return SimpleNamespace(query=lambda _filter: {"counters": [counter("items_read", 100 * done),
                                                                       counter("embedded", 90 * done)]})

    result = FakeResult()
    with caplog.at_level(logging.INFO, logger="beam_pipeline.runner"):
        runner.wait(result, embed._progress_line, poll_seconds=0.01)
    assert result.polls == [10, 10, 10, None]
    lines = [r.getMessage() for r in caplog.records if "progress" in r.getMessage()]
    assert lines == ["progress: embed items_read 100, decoded 0, embedded 90, failed 0",
                     "progress: embed items_read 200, decoded 0, embedded 180, failed 0"]


def test_every_stage_counts_in_one_namespace():
    """Counters of every stage's DoFns (runner.counter) are read back by name from the one namespace; with
    names, only those (others of the namespace, e.g. RunInference's, are left out)."""
    import apache_beam as beam

    class Count(beam.DoFn):
        def __init__(self):
            self._seen = runner.counter("seen")
            self._other = runner.counter("other")
            self._sizes = runner.distribution("sizes")

        def process(self, x):
            self._seen.inc()
            self._other.inc(2)
            self._sizes.update(x)
            yield x

    options = PipelineOptions([])
    pipeline = runner.new_pipeline(options)
    _ = pipeline | beam.Create([1, 2, 3]) | beam.ParDo(Count())
    result = runner.run(pipeline, options)
    assert runner.counters(result) == {"seen": 3, "other": 6}
    assert runner.counters(result, ("seen", "never")) == {"seen": 3, "never": 0}
    assert runner.distribution_of(result, "sizes") == {"max": 3, "mean": 2.0, "count": 3}
    assert runner.distribution_of(result, "absent") is None
