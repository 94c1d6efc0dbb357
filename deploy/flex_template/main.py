"""The Flex Template launcher's entry: one `siamese-dedup nightly` run per launch (beam_pipeline.nightly).

Dataflow's Python launcher (the base image's binary) runs this file with the template's parameters and the
job's environment as flags, roughly:

    python main.py --catalogue=gs://B/catalogue/**/*.jpg --model_dir=gs://B/model --state=gs://B/dedup_state \
        [--recalibrate=true] --runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp \
        --staging_location=gs://B/staging --job_name=NAME --setup_file=/template/setup.py \
        --template_location=gs://B/staging/template_launches/JOB_ID/job_object

and then creates the Dataflow job described by the file the program wrote at --template_location. A
nightly run is not one pipeline but several in a row (embed, match, dedup), each reading what the one
before wrote, with work between them (listing and hashing the catalogue, committing the state). Passed on
as it is, --template_location would make every stage write its job description there instead of running,
and the run would go on with outputs that were never made. So, before nightly.run sees the flags:

- --template_location is taken out: every stage submits its own Dataflow job and waits for it, from the
  launcher VM (which holds the state's lock for the whole run);
- --job_name becomes NAME-stage: the launch's own job already holds NAME while it is active;
- a boolean parameter arrives as --recalibrate=true / --break_lock=false (the launcher passes every
  parameter as --name=value); it becomes the bare flag, or nothing.

After the run, the launcher still needs a job to create: a one-step summary job (it logs the run's manifest
on one worker, then ends) is written to --template_location, so the launch ends in a job named NAME whose
state says whether the night succeeded. A run that fails writes nothing there: the launch fails, and the
launcher's console log holds the error (for a locked state, the lock holder).

Outside the launcher (no --template_location) the flags go to nightly.run as they are, booleans aside.
"""
from __future__ import annotations

import json
import logging
import sys

LOG = logging.getLogger("siamese_dedup.flex_template")
TRUE, FALSE = "true", "false"
# Flags the launcher adds for the job it creates that the summary job must not inherit: its workers need
# nothing beyond Beam (no package to build and install).
NOT_FOR_SUMMARY_JOB = ("--setup_file", "--requirements_file", "--extra_package", "--extra_packages")


def _boolean_flags() -> set[str]:
    """The nightly flags that take no value (store_true): --recalibrate, --break_lock."""
    from beam_pipeline import nightly

    return {opt for action in nightly.build_parser()._actions
            if action.nargs == 0 and action.const is True for opt in action.option_strings}


def _split(arg: str) -> tuple[str, str | None]:
    name, eq, value = arg.partition("=")
    return name, (value if eq else None)


def _without(args: list[str], names: tuple[str, ...]) -> list[str]:
    """`args` less the flags `names`, given as --name=value or as --name value."""
    out, i = [], 0
    while i < len(args):
        name, value = _split(args[i])
        if name in names:
            if value is None and i + 1 < len(args) and not args[i + 1].startswith("--"):
                i += 1
        else:
            out.append(args[i])
        i += 1
    return out


def launcher_argv(argv: list[str]) -> tuple[list[str], str | None, str | None]:
    """(the flags for nightly.run, --template_location or None, --job_name or None), as described above.
    Without --template_location only the boolean parameters change."""
    booleans = _boolean_flags()
    under_launcher = any(_split(a)[0] == "--template_location" for a in argv)
    out: list[str] = []
    template_location = job_name = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, value = _split(arg)
        if under_launcher and name in ("--template_location", "--job_name"):
            if value is None:  # --flag VALUE
                i += 1
                value = argv[i] if i < len(argv) else ""
            if name == "--template_location":
                template_location = value
            else:
                job_name = value
        elif name in booleans and value is not None:
            if value.strip().lower() == TRUE:
                out.append(name)
            elif value.strip().lower() != FALSE:
                raise ValueError(f"{name} is {TRUE} or {FALSE}, got {value!r}")
        else:
            out.append(arg)
        i += 1
    if not under_launcher:
        return out, None, None
    if job_name:
        out.append(f"--job_name={job_name}-stage")
    if not any(_split(a)[0] == "--runner" for a in out):
        out.append("--runner=DataflowRunner")
    return out, template_location, job_name


def summary_job_argv(nightly_argv: list[str], template_location: str, job_name: str | None) -> list[str]:
    """Beam flags of the summary job: the run's Beam flags (nightly's own dropped), written to the launch's
    --template_location under the launch's --job_name, one worker, no package to install."""
    from beam_pipeline import nightly

    parser = nightly.build_parser()
    for action in parser._actions:  # only to tell nightly's flags from Beam's here: none is required
        action.required = False
    _, beam_args = parser.parse_known_args(nightly_argv)
    out = _without(beam_args, NOT_FOR_SUMMARY_JOB + ("--job_name",))
    out += [f"--template_location={template_location}", "--max_num_workers=1"]
    if job_name:
        out.append(f"--job_name={job_name}")
    return out


def build_summary_pipeline(beam_argv: list[str], manifest: dict):
    """A one-step pipeline that logs the manifest's summary (run date, counts, threshold) on a worker."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    keys = ("run_date", "run_id", "generation", "full", "full_reason", "counts", "threshold")
    line = "siamese-dedup nightly: " + json.dumps({k: manifest[k] for k in keys if k in manifest}, sort_keys=True,
                                                  default=str)
    pipeline = beam.Pipeline(options=PipelineOptions(beam_argv))
    # logging.info itself, not a function of this file: pickled by reference whatever the pickler.
    _ = pipeline | "Manifest" >> beam.Create([line]) | "Log" >> beam.Map(logging.info)
    return pipeline


def main(argv: list[str]) -> dict:
    from beam_pipeline import nightly

    nightly_argv, template_location, job_name = launcher_argv(list(argv))
    manifest = nightly.run(nightly_argv)
    if template_location:
        pipeline = build_summary_pipeline(summary_job_argv(nightly_argv, template_location, job_name), manifest or {})
        pipeline.run()  # with --template_location: writes the job description for the launcher, submits nothing
        LOG.info("wrote the summary job for the launcher to %s", template_location)
    return manifest


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    main(sys.argv[1:])
