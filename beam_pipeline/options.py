"""Pipeline options of every stage, in one place.

Each stage's options subclass PipelineOptions, so they parse beside Beam's own flags (runner, project,
region, temp_location, setup_file, ...) and travel to Dataflow workers.
"""
from __future__ import annotations

import datetime
import uuid

from apache_beam.options.pipeline_options import PipelineOptions


def new_run_id() -> str:
    """A run id that sorts by time: UTC timestamp plus a random suffix."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def _add(parser, *flags, required: bool = False, **kwargs) -> None:
    """`parser.add_argument`, tolerant of the other stages' classes.

    Beam parses the flags of every PipelineOptions subclass with one parser (get_all_options, when a
    pipeline runs), so stages sharing --output or --templates would conflict, and a flag required by one
    stage would fail every other stage's run. Shared flags are added once, and `required` is recorded
    on the parser's `_stage_required` list and checked by `parse_stage_options` for the stage being run.
    """
    if any(flag in parser._option_string_actions for flag in flags):
        return
    if required and kwargs.get("help"):
        kwargs["help"] = "Required. " + kwargs["help"]
    parser.add_argument(*flags, **kwargs)
    if required:
        if not hasattr(parser, "_stage_required"):
            parser._stage_required = []
        parser._stage_required.append(flags[0])


def _add_run_id(parser) -> None:
    _add(
        parser,
        "--run_id", default=None, help="Identifier written on every output row (default: a new timestamped id)."
    )


def _add_threshold(parser) -> None:
    _add(
        parser,
        "--threshold",
        type=float,
        default=None,
        help="Match threshold in angular similarity [0, 1]. Default: the model card's calibrated threshold "
        "at --target_fmr.",
    )
    _add(
        parser,
        "--target_fmr",
        type=float,
        default=1e-4,
        help="False match rate whose calibrated threshold is read from the model card when --threshold is "
        "not given (default 1e-4).",
    )
    _add(
        parser,
        "--threshold_protocol",
        default="instance",
        choices=["instance", "class"],
        help="Which calibration of the model card to use: 'instance' (copies of one image: dedup) or "
        "'class' (same class). Default instance.",
    )


class EmbedOptions(PipelineOptions):
    """Options of the embed pipeline: images in, templates and failures out."""

    @classmethod
    def _add_argparse_args(cls, parser):
        _add(parser, "--input", required=True, help="Glob of image files, local or gs://, e.g. 'cat/**/*.png'.")
        _add(parser, "--model_dir", required=True, help="Encoder artefact directory (model.keras + model_card.json).")
        _add(parser, "--output", required=True, help="Output directory; writes templates/ and failures/ under it.")
        _add(parser, "--batch_size", type=int, default=256, help="Inference batch size (max; default 256).")
        _add(parser, "--min_batch_size", type=int, default=1, help="Smallest inference batch (default 1).")
        _add(
            parser,
            "--max_pixels",
            type=int,
            default=50_000_000,
            help="Refuse images whose declared width*height exceeds this (decompression bombs; default 5e7).",
        )
        _add(
            parser,
            "--max_file_bytes",
            type=int,
            default=200_000_000,
            help="Refuse (failures stage 'read') files larger than this many bytes (default 2e8; 0: no limit).",
        )
        _add(
            parser,
            "--share_model_across_processes",
            action="store_true",
            help="Load one encoder per machine shared by its SDK processes instead of one per process.",
        )
        _add(parser, "--num_shards", type=int, default=0, help="Output shards (0: let the runner choose).")
        _add_run_id(parser)


class MatchOptions(PipelineOptions):
    """Options of the match pipeline: templates in, matched pairs out."""

    @classmethod
    def _add_argparse_args(cls, parser):
        _add(parser, "--templates", required=True, help="Glob of templates Parquet files.")
        _add(parser, "--output", required=True, help="Output directory; writes matches/ and match_run.json.")
        _add(
            parser,
            "--model_dir", default=None, help="Encoder artefact directory; its model card supplies the threshold."
        )
        _add_threshold(parser)
        _add(parser, "--block_size", type=int, default=4096, help="Rows per block of the similarity kernel.")
        _add(parser, "--num_shards", type=int, default=0, help="Output shards (0: let the runner choose).")
        _add_run_id(parser)


class DedupOptions(PipelineOptions):
    """Options of the dedup pipeline: templates and matches in, clusters out."""

    @classmethod
    def _add_argparse_args(cls, parser):
        _add(parser, "--templates", required=True, help="Glob of templates Parquet files.")
        _add(parser, "--matches", required=True, help="Glob of matches Parquet files.")
        _add(parser, "--output", required=True, help="Output directory; writes clusters/ under it.")
        _add(
            parser,
            "--keeper_policy",
            default="first_id",
            choices=["first_id", "largest_image"],
            help="Which member of a cluster is kept (ties broken by item_id). Default first_id.",
        )
        _add(parser, "--num_shards", type=int, default=0, help="Output shards (0: let the runner choose).")
        _add_run_id(parser)


def parse_stage_options(argv, options_cls, description: str):
    """Parse `argv` into (PipelineOptions, the stage's options view).

    `--help` shows the stage's own flags (Beam's full list of runner flags would bury them), with a note
    that Beam's flags are accepted as well.
    """
    import argparse
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        parser = argparse.ArgumentParser(
            description=description,
            epilog="Apache Beam pipeline flags are accepted too: --runner (DirectRunner by default; "
            "DataflowRunner), --project, --region, --temp_location, --staging_location, "
            "--setup_file ./setup.py, --direct_running_mode, --direct_num_workers, --dry_run, ...",
        )
        options_cls._add_argparse_args(parser)
        parser.parse_args(["--help"])
    pipeline_options = PipelineOptions(argv)
    view = pipeline_options.view_as(options_cls)
    # Required flags of this stage only (see _add); argparse's own message and exit status 2.
    parser = argparse.ArgumentParser(description=description)
    options_cls._add_argparse_args(parser)
    missing = [f for f in getattr(parser, "_stage_required", []) if getattr(view, f.lstrip("-")) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return pipeline_options, view
