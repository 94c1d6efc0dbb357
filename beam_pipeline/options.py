"""Pipeline options of every stage, in one place.

Each stage's options subclass PipelineOptions, so they parse beside Beam's own flags (runner, project,
region, temp_location, setup_file, ...) and travel to Dataflow workers.
"""
from __future__ import annotations

import argparse
import datetime
import math
import uuid

from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipeline import sources, thresholds
from schemas.documents import THRESHOLD_PROTOCOLS
from siamese_core import decode
from siamese_core.similarity import KNN_BETA, KNN_K, SCORE_NORMS


def bounded(cast, low=None, high=None, *, low_open: bool = False, high_open: bool = False):
    """An argparse `type`: `cast` the text, then refuse values outside [low, high] (open ends where asked),
    so a bad value is refused where the flag is parsed, argparse-style (one line, exit status 2)."""
    def check(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if cast is int else ' number'}")
        if cast is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {' and '.join(x for x in (lo, hi) if x)}")
        return value
    check.__name__ = cast.__name__
    return check


THRESHOLD = bounded(float, 0.0, thresholds.MAX_THRESHOLD)  # angular similarity a float32 kernel resolves
OPEN_UNIT_INTERVAL = bounded(float, 0.0, 1.0, low_open=True, high_open=True)
NON_NEGATIVE_INT = bounded(int, 0)
POSITIVE_INT = bounded(int, 1)
NON_NEGATIVE_FLOAT = bounded(float, 0.0)


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
    """The match threshold: at most one of --threshold, --target_fmr, --target_precision, --max_false_pairs,
    --review_threshold;
    none means self-calibration at the default precision (beam_pipeline.self_calibration)."""
    _add(
        parser,
        "--threshold",
        type=THRESHOLD,
        default=None,
        help="Match threshold in angular similarity [0, 1] (with --score_norm knn: a normalised score in the same "
        "range). Default: chosen for this catalogue by self-calibration (see --target_precision).",
    )
    _add(
        parser,
        "--target_fmr",
        type=OPEN_UNIT_INTERVAL,
        default=None,
        help="Use the model card's threshold calibrated at this false match rate (an explicit choice: the "
        "card was calibrated on its own held-out pairs, not on this catalogue).",
    )
    _add(
        parser,
        "--target_precision",
        type=OPEN_UNIT_INTERVAL,
        default=None,
        help="Self-calibration: the smallest threshold at which the expected false pairs are at most "
        "(1 - this) x the predicted pairs. Default 0.97 when no other threshold flag is given.",
    )
    _add(
        parser,
        "--max_false_pairs",
        type=NON_NEGATIVE_FLOAT,
        default=None,
        help="Self-calibration: the smallest threshold at which at most this many false pairs are expected.",
    )
    _add(
        parser,
        "--review_threshold",
        default=None,
        help="Use the threshold a person's labels chose: the review_threshold.json written by `siamese-dedup "
        "review import` (same model; its score, angular or kNN-normalised, is the run's).",
    )
    _add(
        parser,
        "--calibration_copies",
        type=NON_NEGATIVE_INT,
        default=400,
        help="Self-calibration: synthetic copies (catalogue items edited by trainer.copy_edits, embedded by the "
        "model) that estimate what a duplicate scores. 0: none (the tail fit is then conservative). Default 400.",
    )
    _add(
        parser,
        "--threshold_protocol",
        default="instance",
        choices=THRESHOLD_PROTOCOLS,
        help="With --target_fmr: which calibration of the model card to use: 'instance' (copies of one "
        "image: dedup) or 'class' (same class). Default instance.",
    )


class EmbedOptions(PipelineOptions):
    """Options of the embed pipeline: a catalogue in, templates and failures out."""

    @classmethod
    def _add_argparse_args(cls, parser):
        _add(
            parser,
            "--input",
            required=True,
            help="Glob of the catalogue, local or gs://: image files ('cat/**/*.png'), TFRecord shards "
            "('cat/train-*.tfrecord'), Parquet files or tar shards (WebDataset style).",
        )
        _add(parser, "--model_dir", required=True, help="Encoder artefact directory (model.keras + model_card.json).")
        _add(parser, "--output", required=True, help="Output directory; writes templates/ and failures/ under it.")
        _add(parser, "--input_list", default=None,
             help="Embed only these image files: a text file (local or gs://) of paths under --input's prefix, one "
             "per line (item ids are still relative to --input's prefix; the nightly run embeds what changed).")
        _add(
            parser,
            "--input_format",
            default="auto",
            choices=["auto", *sources.FORMATS],
            help="What --input holds. auto (default): from the suffixes of (the first 1000 of) the matched "
            "paths (.tfrecord[.gz], .tfrec, .parquet, .tar[.gz], .tgz; anything else is an image file).",
        )
        _add(
            parser,
            "--image_key",
            default=None,
            help="TFRecord feature / Parquet column holding the image bytes (default: the first of "
            f"{', '.join(sources.IMAGE_KEYS)}; Parquet: else the only binary column).",
        )
        _add(
            parser,
            "--id_key",
            default=None,
            help="TFRecord feature / Parquet column holding the item id (default: the first of id, item_id, "
            "image/id, image/source_id, key, __key__; none: '<shard>#<position>').",
        )
        _add(
            parser,
            "--label_key",
            default=None,
            help="TFRecord feature / Parquet column / tar member extension (e.g. cls) holding a label; when "
            "given, writes labels/ (item_id, source_uri, label) beside the templates.",
        )
        _add(
            parser,
            "--batch_size",
            type=POSITIVE_INT,
            default=256,
            help="Images per model call (default 256; the last of a bundle may be smaller).",
        )
        _add(
            parser,
            "--decode_threads",
            type=NON_NEGATIVE_INT,
            default=0,
            help="Threads each worker process decodes images with (default 0: its cores, at most 4).",
        )
        _add(
            parser,
            "--max_pixels",
            type=POSITIVE_INT,
            default=decode.DEFAULT_MAX_PIXELS,
            help="Refuse images whose declared width*height exceeds this (decompression bombs; default 5e7).",
        )
        _add(
            parser,
            "--max_file_bytes",
            type=NON_NEGATIVE_INT,
            default=sources.DEFAULT_MAX_FILE_BYTES,
            help="Refuse (failures stage 'read') files, records or members larger than this many bytes "
            "(default 2e8; 0: no limit).",
        )
        _add(
            parser,
            "--allow_all_failed",
            action="store_true",
            help="Publish the outputs even when every item failed (default: such a run is an error, exit status "
            "2, and the previous outputs stay).",
        )
        _add(
            parser,
            "--share_model_across_processes",
            action="store_true",
            help="Load one encoder per machine shared by its SDK processes instead of one per process.",
        )
        _add(parser, "--num_shards", type=NON_NEGATIVE_INT, default=0, help="Output shards (0: let the runner choose).")
        _add(
            parser,
            "--row_group_rows",
            type=POSITIVE_INT,
            default=8192,
            help="Rows per Parquet row group of the templates (default 8192, the match stage's --block_size: "
            "it streams the templates a row group at a time into blocks of that many rows).",
        )
        _add_run_id(parser)


class MatchOptions(PipelineOptions):
    """Options of the match pipeline: templates in, matched pairs out."""

    @classmethod
    def _add_argparse_args(cls, parser):
        from beam_pipeline import match  # the valid --mode / --search values live beside their builders

        _add(parser, "--templates", required=True, help="Glob of templates Parquet files (the catalogue).")
        _add(parser, "--output", required=True, help="Output directory; writes matches/ and match_run.json.")
        _add(
            parser,
            "--model_dir", default=None, help="Encoder artefact directory; its model card supplies the threshold."
        )
        _add_threshold(parser)
        _add(
            parser,
            "--mode",
            default="all_pairs",
            choices=match.MODES,
            help="all_pairs: every pair within the catalogue; queries: --queries templates against the catalogue "
            "(1:N, --top_k per query); pairs: verify the pairs listed in --pairs (1:1). Default all_pairs.",
        )
        _add(
            parser,
            "--search",
            default="exact",
            choices=match.SEARCHES,
            help="all_pairs only. exact: blocked matrix products over every block pair; approximate: k-means "
            "partitions with multi-assignment, recall measured against exact search on --recall_sample items. "
            "Default exact.",
        )
        _add(
            parser,
            "--score_norm",
            default=None,
            choices=list(SCORE_NORMS),
            help="What the threshold cuts. none: the angular similarity; knn: the angular similarity less "
            "--knn_beta x the mean of the two items' similarities to their --knn_k-th nearest other item "
            "(siamese_core.similarity.knn_normalised; --mode all_pairs --search exact; --threshold is then a "
            "normalised score). Default: the model card's training.score_norm for a self-calibrated all-pairs "
            "exact run, else none.",
        )
        _add(parser, "--knn_k", type=POSITIVE_INT, default=KNN_K,
             help=f"--score_norm knn: the neighbour whose similarity normalises an item's pairs (above the size "
             f"of a duplicate group). Default {KNN_K}.")
        _add(parser, "--knn_beta", type=NON_NEGATIVE_FLOAT, default=KNN_BETA,
             help=f"--score_norm knn: weight of the neighbours' similarity. Default {KNN_BETA}.")
        _add(parser, "--queries", default=None, help="Glob of query templates Parquet files (--mode queries).")
        _add(parser, "--top_k", type=NON_NEGATIVE_INT, default=10,
             help="--mode queries: keep at most this many matches per query, best first (0: all at or above the "
             "threshold). Default 10.")
        _add(parser, "--pairs", default=None,
             help="--mode pairs: CSV (header left_id,right_id) or Parquet glob of the pairs to verify; every pair's "
             "score is written to verifications/.")
        _add(parser, "--block_size", type=POSITIVE_INT, default=8192,
             help="Rows per block: a task holds two blocks (block_size x dim x 4 bytes each). Default 8192.")
        _add(parser, "--kernel_threads", type=NON_NEGATIVE_INT, default=0,
             help="Threads of the similarity kernel per worker, each with single-threaded BLAS (0: the CPUs this "
             "process may use; set 1 when the runner already runs one worker process per core).")
        _add(parser, "--partitions", type=NON_NEGATIVE_INT, default=0,
             help="--search approximate: k-means partitions (0: one per ~2048 items).")
        _add(parser, "--max_assign", type=POSITIVE_INT, default=3,
             help="--search approximate: most partitions an item is assigned to (its home plus guests within the "
             "angular margin that guarantees exactness; the cap is what trades recall for time). Default 3.")
        _add(parser, "--kmeans_sample", type=POSITIVE_INT, default=50_000,
             help="--search approximate: items the k-means centroids are learnt from. Default 50000.")
        _add(parser, "--kmeans_iters", type=POSITIVE_INT, default=10, help="--search approximate: k-means iterations.")
        _add(parser, "--recall_sample", type=POSITIVE_INT, default=1000,
             help="--search approximate: items matched exactly against the whole catalogue to measure the recall "
             "(written to match_run.json and the report). Default 1000.")
        _add(parser, "--seed", type=int, default=0, help="Seed of the k-means and recall samples. Default 0.")
        _add(parser, "--staging_dir", default=None,
             help="Where the templates are staged in blocks (default OUTPUT/_staging/RUN_ID); deleted after the run.")
        _add(parser, "--keep_staging", action="store_true", help="Keep the staged blocks after the run.")
        _add(parser, "--num_shards", type=NON_NEGATIVE_INT, default=0, help="Output shards (0: let the runner choose).")
        _add_run_id(parser)


class DedupOptions(PipelineOptions):
    """Options of the dedup pipeline: templates and matches in, clusters out."""

    @classmethod
    def _add_argparse_args(cls, parser):
        from beam_pipeline import clustering  # the valid --linkage / --keeper_policy values and defaults live there

        defaults = clustering.ClusterConfig()

        _add(parser, "--templates", required=True, help="Glob of templates Parquet files.")
        _add(parser, "--matches", required=True, help="Glob of matches Parquet files.")
        _add(parser, "--output", required=True, help="Output directory; writes clusters/ under it.")
        _add(
            parser,
            "--keeper_policy",
            default=defaults.keeper_policy,
            choices=clustering.KEEPER_POLICIES,
            help="Which member of a cluster is kept: first_id (smallest item_id), largest_image (width*height), "
            "oldest (earliest embedded_at: first embedded), column (--keeper_column of --keeper_table). Ties: smallest item_id. "
            "Default first_id.",
        )
        _add(parser, "--keeper_table", default=None,
             help="keeper_policy column: Parquet glob or CSV with item_id and --keeper_column (items missing from "
             "it rank last).")
        _add(parser, "--keeper_column", default=None, help="keeper_policy column: the column to rank members by.")
        _add(parser, "--keeper_order", default=defaults.keeper_order, choices=clustering.KEEPER_ORDERS,
             help="keeper_policy column: keep the member with the largest (max) or smallest (min) value.")
        _add(parser, "--linkage", default=defaults.linkage, choices=clustering.LINKAGES,
             help="complete: complete linkage on the matches, so every two members of a cluster are a matched "
             "pair (nothing is grouped through a chain); single: clusters are connected components of the "
             f"matches, chains flagged is_chained (they can join a whole catalogue). Default "
             f"{defaults.linkage}.")
        _add(parser, "--chain_margin", type=NON_NEGATIVE_FLOAT, default=defaults.chain_margin,
             help="--linkage single: a cluster is flagged is_chained when two of its members are more than this "
             f"far (angular similarity) below the match threshold from each other. Default {defaults.chain_margin}.")
        _add(parser, "--threshold", type=THRESHOLD, default=None,
             help="The match threshold (angular similarity): pairs below it do not count as matching for "
             "complete linkage, and the reference of the chain flags (at or above the matches' own). Default: the "
             "threshold the matches were made at (their lineage), else the weakest matched pair.")
        _add(parser, "--max_diameter_members", type=bounded(int, 2), default=defaults.max_diameter_members,
             help="--linkage single: clusters larger than this are measured on a deterministic sample of this "
             f"many members (min_member_similarity is then an upper bound). Default {defaults.max_diameter_members}. "
             "(Complete linkage "
             "reads every cluster's weakest pair from the matches, exactly.)")
        _add(parser, "--num_shards", type=NON_NEGATIVE_INT, default=0, help="Output shards (0: let the runner choose).")
        _add_run_id(parser)


class WatchOptions(PipelineOptions):
    """Options of the streaming watcher (beam_pipeline.streaming): new files in, their duplicates out."""

    @classmethod
    def _add_argparse_args(cls, parser):
        # Flags other stages share (--input, --model_dir, --output, --templates, --threshold, --batch_size,
        # --max_pixels, --max_file_bytes, --run_id) are added once (see _add), with the same defaults.
        _add(parser, "--input", required=True,
             help="Glob of the catalogue location to watch for new image files, local or gs:// ('drop/**/*.jpg').")
        _add(parser, "--model_dir", required=True, help="Encoder artefact directory (model.keras + model_card.json).")
        _add(parser, "--output", required=True,
             help="Output directory; writes duplicates/, failures/ and checked/ (JSON lines) under it.")
        _add(parser, "--state", default=None,
             help="A nightly state directory (siamese-dedup nightly --state): new files are matched against its "
             "committed catalogue's templates, at its threshold (unless --threshold).")
        _add(parser, "--templates", default=None,
             help="Instead of --state: glob of the templates Parquet files of the indexed catalogue (needs "
             "--threshold).")
        _add(parser, "--threshold", type=THRESHOLD, default=None,
             help="Angular similarity at or above which a new file duplicates a catalogue item (default with "
             "--state: the state's threshold).")
        _add(parser, "--poll_interval", type=bounded(float, 0.0, low_open=True), default=5.0,
             help="Seconds between two listings of --input (default 5).")
        _add(parser, "--stop_after_seconds", type=NON_NEGATIVE_FLOAT, default=0.0,
             help="Stop watching after this many seconds (default 0: watch until interrupted).")
        _add(parser, "--include_existing", action="store_true",
             help="Also match files last modified before the watcher started (default: only files written since).")
        _add(parser, "--batch_size", type=POSITIVE_INT, default=256,
             help="Images per model call (default 256; a poll's new files are embedded together).")
        _add(parser, "--max_pixels", type=POSITIVE_INT, default=decode.DEFAULT_MAX_PIXELS,
             help="Refuse images whose declared width*height exceeds this (decompression bombs; default 5e7).")
        _add(parser, "--max_file_bytes", type=NON_NEGATIVE_INT, default=sources.DEFAULT_MAX_FILE_BYTES,
             help="Refuse (failures stage 'read') files larger than this many bytes (default 2e8; 0: no limit).")
        _add_run_id(parser)


def _beam_parser():
    """One parser of every PipelineOptions class (Beam's and the stages'), as Beam itself builds it."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


def unknown_flags(argv: list[str]) -> list[str]:
    """The flags in `argv` that no options class defines (Beam would drop them with a log warning, so a
    misspelt --threshhold would silently run with the default)."""
    _, unknown = _beam_parser().parse_known_args(argv)
    return [a.split("=", 1)[0] for a in unknown if a.startswith("-")]


def parse_stage_options(argv, options_cls, description: str):
    """Parse `argv` into (PipelineOptions, the stage's options view).

    `--help` shows the stage's own flags (Beam's full list of runner flags would bury them), with a note
    that Beam's flags are accepted as well. Flags are checked here, argparse-style (a one-line message and
    exit status 2): the stage's required flags, each value against its type and range, and flags that no
    stage nor Beam knows.
    """
    import difflib
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
    stage = options_cls.__name__.removesuffix("Options").lower()
    parser = argparse.ArgumentParser(prog=f"siamese-dedup {stage}", description=description,
                                     usage="%(prog)s [flags] (--help lists them)")
    options_cls._add_argparse_args(parser)
    parser.parse_known_args(argv)  # types and ranges of this stage's flags
    unknown = unknown_flags(argv)
    if unknown:
        known = list(_beam_parser()._option_string_actions)
        hints = [f"{u} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(u, known, 1)) else u
                 for u in unknown]
        parser.error(f"unrecognized arguments: {', '.join(hints)}")
    pipeline_options = PipelineOptions(argv)
    view = pipeline_options.view_as(options_cls)
    # Required flags of this stage only (see _add); argparse's own message and exit status 2.
    missing = [f for f in getattr(parser, "_stage_required", []) if getattr(view, f.lstrip("-")) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return pipeline_options, view
