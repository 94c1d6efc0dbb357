"""The `siamese-dedup` command: one subcommand per stage, plus `demo` for the whole job.

Each subcommand hands its remaining arguments to the stage's own `run(argv)`, which parses them (Beam
runner flags included for the pipelines), so `siamese-dedup embed --runner DataflowRunner ...` works as
`python -m beam_pipeline.embed --runner DataflowRunner ...` would. Stage modules are imported only when
their subcommand runs: `--help` does not wait for TensorFlow.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
import traceback

# Set (to anything but "" or "0"), or pass --debug, to see the traceback behind a one-line error.
DEBUG_ENV = "SIAMESE_DEDUP_DEBUG"
# Exit statuses: a user's mistake in flags or input (argparse's own status), and Ctrl-C or SIGTERM (128 +
# SIGINT, as a shell reports Ctrl-C).
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

STAGES = {
    "train": ("trainer.train", "Train a triplet-loss encoder and export model.keras + model_card.json."),
    "embed": ("beam_pipeline.embed", "Embed a catalogue of images into templates Parquet (Beam)."),
    "match": ("beam_pipeline.match", "Match all pairs of templates above a threshold (Beam)."),
    "dedup": ("beam_pipeline.dedup", "Group matches into clusters and pick a keeper per cluster (Beam)."),
    "report": ("beam_pipeline.report", "Write report.json and report.html (figures, galleries, evaluation)."),
    "review": ("beam_pipeline.review", "Export the pairs near the threshold for labelling; import the labels to "
               "recalibrate the threshold and write hard negatives."),
    "nightly": ("beam_pipeline.nightly", "Nightly incremental dedup: embed and match only what changed since the "
                "last run, keep the state (local or gs://)."),
    "watch": ("beam_pipeline.streaming", "Watch a folder for new files and report their duplicates (streaming Beam)."),
    "demo": ("beam_pipeline.demo", "Run the whole job end to end on Fashion-MNIST with planted duplicates."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="siamese-dedup",
        description="Learned image similarity and catalogue deduplication. "
        "Run `siamese-dedup STAGE --help` for a stage's options.",
    )
    parser.add_argument("--log_level", default="INFO", help="Logging level (default INFO).")
    parser.add_argument("--debug", action="store_true",
                        help=f"Show the traceback behind an error (or set {DEBUG_ENV}=1).")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, (_, help_text) in STAGES.items():
        # add_help=False: the stage's own parser answers --help with its real options.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None, *, interrupted: list | None = None) -> int:
    """Run one stage; returns the exit status. `interrupted` (a list, when given) gets an entry if a SIGINT
    or SIGTERM came during the run, whether the stage stopped with an error (EXIT_INTERRUPTED) or took it
    as its way to stop (`watch`, `nightly --serve_at`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    module_name, _ = STAGES[args.stage]
    module = importlib.import_module(module_name)
    interrupted = [] if interrupted is None else interrupted
    try:
        with noting_interrupts(interrupted):
            summary = module.run(rest)
    except BaseException as err:
        if debug or isinstance(err, SystemExit):
            raise
        if isinstance(err, KeyboardInterrupt):
            # Ctrl-C or SIGTERM (noting_interrupts turns whatever error it surfaced as into this); the
            # stage's staging area was removed on the way out.
            print(f"siamese-dedup {args.stage}: interrupted: nothing was published, the previous outputs are as "
                  "they were", file=sys.stderr)
            return EXIT_INTERRUPTED
        if not isinstance(err, (ValueError, OSError)):
            raise
        # A user's input or flags (a bad value, a missing or unreadable file, inputs that do not belong
        # together: beam_pipeline.outputs.LineageError), or the machine's (a full disk, no permission):
        # one line, not a traceback. Failures the pipelines catch per item go to the failures table.
        print(f"siamese-dedup {args.stage}: error: {_one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USER_ERROR
    if summary is not None and args.stage != "demo":
        print(json.dumps(summary, indent=2, default=str))
    return 0


def console_main() -> None:
    """The process's entry point (`siamese-dedup`, `python -m beam_pipeline.cli`): main(), then exit.

    After a Ctrl-C the process ends at once, without waiting for its other threads. A pipeline stopped
    midway can leave threads that will never finish (an executor's worker on a task that waits for the
    rest of the run, a non-daemon thread), and Python waits for those at exit: the command then hung
    after saying it had stopped (CI saw `embed` do this). Nothing is left to finish by then: the stage
    removed its staging area on the way out, and its message is printed.
    """
    interrupted: list = []
    try:
        code = main(interrupted=interrupted)
    except BaseException:
        if not interrupted:
            raise
        traceback.print_exc()  # --debug asked for the traceback behind the interruption
        code = EXIT_INTERRUPTED
    if interrupted:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# The signals that stop a run the way Ctrl-C does (its staging area removed, a lock it holds released):
# SIGINT, and SIGTERM, what `docker stop`, Kubernetes and systemd send by default.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def noting_interrupts(interrupted: list):
    """Append to `interrupted` on SIGINT or SIGTERM, then raise KeyboardInterrupt as Ctrl-C does. An error
    that leaves the block after such a signal leaves it as a KeyboardInterrupt (from that error): Beam
    re-raises a KeyboardInterrupt inside a transform as a RuntimeError, and a stop must stay a stop. Nested
    (a stage that watches for its own interruption, inside the command's): every enclosing list gets the
    entry too. Main thread only (signal's rule)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    enclosing = getattr(signal.getsignal(signal.SIGINT), "noting", [])

    def note(signum, frame):
        for noting in note.noting:
            noting.append(signal.Signals(signum).name)
        signal.default_int_handler(signum, frame)

    note.noting = [interrupted, *enclosing]
    previous = {signum: signal.signal(signum, note) for signum in STOP_SIGNALS}
    try:
        yield
    except Exception as err:
        if interrupted:
            raise KeyboardInterrupt(f"stopped by {interrupted[0]}") from err
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if text else type(err).__name__


if __name__ == "__main__":
    console_main()
