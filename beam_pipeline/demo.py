"""The whole job, end to end, on the embedded default data (Fashion-MNIST from the Debian package).

1. train an encoder on the train split (triplet loss, cosine distance, margin 0.4);
2. write the test split as a catalogue of PNG files with planted near-duplicates (augmented copies made
   by the trainer's own augmentation) and a few broken files, keeping the ground truth beside it;
3. embed the catalogue with the Beam embed pipeline (DirectRunner, batched RunInference);
4. match all pairs by angular similarity; 5. deduplicate into clusters with a keeper each;
6. write report.json and report.html, scored against the planted ground truth;
and print a summary naming every output.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import itertools
import json
import logging
import os
import time

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# Files that are not images (or broken ones): the embed stage must turn each into a failures row.
BROKEN_FILES = {
    "empty": b"",
    "not_an_image": b"this is a text file, not a PNG\n",
}


@dataclasses.dataclass
class Catalogue:
    """A catalogue written by `write_catalogue`."""

    image_glob: str
    ground_truth_csv: str
    manifest_csv: str
    items: int
    planted_pairs: int
    broken_items: int


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_catalogue(
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str,
    *,
    planted: int,
    max_copies: int = 2,
    seed: int = 0,
    broken: bool = True,
) -> Catalogue:
    """Write `images` (n, H, W) uint8 as PNG files with planted near-duplicates.

    `planted` originals, chosen at random, get 1..`max_copies` augmented copies each. File names are
    shuffled (`item_000123.png`) so nothing in a name gives a copy away. The ground truth CSV lists every
    pair of items that show the same original photo (left_id < right_id); the manifest lists each item's
    source index, label and whether it is a copy. With `broken`, a truncated PNG, an empty file and a text
    file are added too: they must come out of the pipeline as failures rows.
    """
    from trainer.augment import augment_image

    rng = np.random.default_rng(seed)
    n = len(images)
    if not 0 <= planted <= n:
        raise ValueError(f"planted must lie in [0, {n}], got {planted}")
    originals = rng.choice(n, size=planted, replace=False)
    copies_per_original = rng.integers(1, max_copies + 1, size=planted)
    # entries: (source index, copy number: 0 is the original photo)
    entries = [(i, 0) for i in range(n)]
    for source, count in zip(originals, copies_per_original):
        entries.extend((int(source), c) for c in range(1, int(count) + 1))
    broken_payloads = []
    if broken:
        truncated = _png_bytes(images[0])[:40]
        broken_payloads = [("truncated_png", truncated), *BROKEN_FILES.items()]
    order = rng.permutation(len(entries) + len(broken_payloads))
    names = [f"item_{k:06d}.png" for k in order]

    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    groups: dict[int, list[str]] = {}
    manifest_rows = []
    for (source, copy), name in zip(entries, names):
        pixels = images[source] if copy == 0 else augment_image(images[source], rng)
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(_png_bytes(pixels))
        groups.setdefault(source, []).append(name)
        manifest_rows.append((name, source, int(labels[source]), copy, "", "near_duplicate" if copy else ""))
    for (kind, payload), name in zip(broken_payloads, names[len(entries):]):
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(payload)
        manifest_rows.append((name, -1, -1, 0, kind, ""))

    return _write_truth(out_dir, groups, manifest_rows, os.path.join(image_dir, "*.png"), len(broken_payloads))


MANIFEST_COLUMNS = ("item_id", "source_index", "label", "copy_number", "broken", "edit")


def _write_truth(out_dir: str, groups: dict, manifest_rows: list, image_glob: str, broken: int) -> Catalogue:
    """ground_truth.csv (every pair of items showing one original, left_id < right_id) and manifest.csv
    (MANIFEST_COLUMNS, one row per file) of a catalogue; `groups` maps an original to its items."""
    pairs = sorted(
        tuple(sorted(pair)) for members in groups.values() if len(members) > 1
        for pair in itertools.combinations(members, 2)
    )
    ground_truth_csv = os.path.join(out_dir, "ground_truth.csv")
    with open(ground_truth_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["left_id", "right_id"])
        writer.writerows(pairs)
    manifest_csv = os.path.join(out_dir, "manifest.csv")
    with open(manifest_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(sorted(manifest_rows))
    return Catalogue(image_glob=image_glob, ground_truth_csv=ground_truth_csv, manifest_csv=manifest_csv,
                     items=len(manifest_rows), planted_pairs=len(pairs), broken_items=broken)


def _jpeg_bytes(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def write_photo_catalogue(
    photos: np.ndarray,
    out_dir: str,
    *,
    planted_fraction: float = 0.4,
    max_copies: int = 3,
    seed: int = 0,
    mirror: bool = True,
    broken: bool = True,
) -> Catalogue:
    """Write `photos` uint8 (n, H, W, 3) as a catalogue of JPEG files with planted, edited copies.

    A `planted_fraction` of the originals, chosen at random, get 1..`max_copies` copies, each made by one
    edit family of trainer.copy_edits (cycled so every family is planted about equally often; MIRROR only
    with `mirror`) and recorded in the manifest's `edit` column. Originals are saved at JPEG quality 92;
    copies come out of the edit as uploaded. Names are shuffled (`item_000123.jpg`). Ground truth and manifest
    as in `write_catalogue`; with `broken`, a truncated JPEG, an empty file and a text file are added.
    """
    from trainer.copy_edits import CopyPlanter, choose_families

    photos = np.asarray(photos)
    if photos.ndim != 4 or photos.shape[-1] != 3 or photos.dtype != np.uint8:
        raise ValueError(f"photos must be uint8 (n, H, W, 3), got {photos.dtype} {photos.shape}")
    if not 0.0 <= planted_fraction <= 1.0 or max_copies < 1:
        raise ValueError("planted_fraction must lie in [0, 1] and max_copies be >= 1")
    rng = np.random.default_rng(seed)
    n = len(photos)
    planted = int(round(n * planted_fraction))
    originals = rng.choice(n, size=planted, replace=False)
    counts = rng.integers(1, max_copies + 1, size=planted)
    families = iter(choose_families(int(counts.sum()), rng, mirror=mirror))
    entries = [(i, 0, "") for i in range(n)]
    for source, count in zip(originals, counts):
        entries.extend((int(source), c, next(families)) for c in range(1, int(count) + 1))
    broken_payloads = []
    if broken:
        broken_payloads = [("truncated_jpeg", _jpeg_bytes(photos[0], 90)[:300]), *BROKEN_FILES.items()]
    order = rng.permutation(len(entries) + len(broken_payloads))
    names = [f"item_{k:06d}.jpg" for k in order]
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    planter = CopyPlanter()
    groups: dict[int, list[str]] = {}
    manifest_rows = []
    for (source, copy, family), name in zip(entries, names):
        if copy == 0:
            payload = _jpeg_bytes(photos[source], 92)
        else:
            payload = _jpeg_bytes(planter(photos[source], family, rng), 95)
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(payload)
        groups.setdefault(source, []).append(name)
        manifest_rows.append((name, source, -1, copy, "", family))
    for (kind, payload), name in zip(broken_payloads, names[len(entries):]):
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(payload)
        manifest_rows.append((name, -1, -1, 0, kind, ""))
    return _write_truth(out_dir, groups, manifest_rows, os.path.join(image_dir, "*.jpg"), len(broken_payloads))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="siamese-dedup demo",
        description="Train on Fashion-MNIST, embed the test split with planted near-duplicates, match, "
        "deduplicate and report, end to end on the DirectRunner.",
    )
    parser.add_argument("--output", default="demo_output", help="Directory for every output (default demo_output).")
    parser.add_argument(
        "--model_dir", default=None, help="Use this trained encoder artefact instead of training one."
    )
    parser.add_argument("--epochs", type=int, default=None, help="Training epochs (default: the trainer's).")
    parser.add_argument(
        "--max_train_items", type=int, default=None, help="Train on at most this many images (quick runs)."
    )
    parser.add_argument(
        "--catalogue_size", type=int, default=None, help="Use the first N test images (default: all 10,000)."
    )
    parser.add_argument("--planted", type=int, default=500, help="Originals that get augmented copies (default 500).")
    parser.add_argument("--max_copies", type=int, default=2, help="Copies per planted original: 1..N (default 2).")
    parser.add_argument("--threshold", type=float, default=None, help="Match threshold in angular similarity.")
    parser.add_argument(
        "--target_fmr", type=float, default=1e-4, help="FMR of the model card threshold to use (default 1e-4)."
    )
    parser.add_argument(
        "--linkage", default="complete", choices=["single", "complete"],
        help="Dedup clusters: complete (default: every two members of a cluster match, so no item is "
        "dropped on the strength of a chain) or single (connected components, chains flagged).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the catalogue and training (default 0).")
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST IDX directory (default: the Debian package's).")
    return parser


def _timed(timings: dict, stage: str, fn, *args):
    log.info("==> %s", stage)
    start = time.perf_counter()
    result = fn(*args)
    timings[stage] = round(time.perf_counter() - start, 2)
    log.info("<== %s done in %.1f s", stage, timings[stage])
    return result


def run(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the summary dict it also writes to OUTPUT/demo_summary.json."""
    from beam_pipeline import dedup, embed, match, report
    from beam_pipeline.options import new_run_id
    from trainer import train
    from trainer.data import load_fashion_mnist

    args = build_parser().parse_args(argv)
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    run_id = new_run_id()
    timings: dict[str, float] = {}
    started = time.perf_counter()

    model_dir = args.model_dir
    train_summary = None
    if model_dir is None:
        model_dir = os.path.join(out, "model")
        train_argv = ["--output", model_dir, "--seed", str(args.seed)]
        for flag in ("epochs", "max_train_items", "data_dir"):
            if getattr(args, flag) is not None:
                train_argv += [f"--{flag}", str(getattr(args, flag))]
        train_summary = _timed(timings, "train", train.run, train_argv)

    def make_catalogue():
        images, labels = load_fashion_mnist("test", args.data_dir)
        if args.catalogue_size is not None:
            images, labels = images[: args.catalogue_size], labels[: args.catalogue_size]
        return write_catalogue(
            images, labels, os.path.join(out, "catalogue"), planted=min(args.planted, len(images)),
            max_copies=args.max_copies, seed=args.seed,
        )

    catalogue = _timed(timings, "catalogue", make_catalogue)
    common = ["--run_id", run_id]
    embed_summary = _timed(
        timings, "embed", embed.run,
        ["--input", catalogue.image_glob, "--model_dir", model_dir, "--output", out, *common],
    )
    threshold_flags = ["--target_fmr", str(args.target_fmr)]
    if args.threshold is not None:
        threshold_flags = ["--threshold", str(args.threshold)]
    templates_glob = os.path.join(out, "templates", "*.parquet")
    match_summary = _timed(
        timings, "match", match.run,
        ["--templates", templates_glob, "--model_dir", model_dir, "--output", out, *threshold_flags, *common],
    )
    dedup_summary = _timed(
        timings, "dedup", dedup.run,
        ["--templates", templates_glob, "--matches", os.path.join(out, "matches", "*.parquet"),
         "--output", out, "--linkage", args.linkage, *common],
    )
    report_summary = _timed(
        timings, "report", report.run,
        ["--workdir", out, "--model_dir", model_dir, "--ground_truth", catalogue.ground_truth_csv],
    )
    timings["total"] = round(time.perf_counter() - started, 2)

    accounted = embed_summary["embedded"] + embed_summary["failed"]
    if accounted != catalogue.items:
        raise RuntimeError(
            f"{catalogue.items} catalogue files but {accounted} templates + failures: items were lost"
        )
    summary = {
        "run_id": run_id,
        "model_dir": model_dir,
        "train": train_summary,
        "catalogue": dataclasses.asdict(catalogue),
        "embed": embed_summary,
        "match": match_summary,
        "dedup": dedup_summary,
        "report": report_summary,
        "seconds": timings,
    }
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(format_summary(summary, out))
    return summary


def format_summary(summary: dict, out: str) -> str:
    """The short text the demo prints: figures, timings and every output path."""
    from beam_pipeline.io import read_json

    card = read_json(os.path.join(summary["model_dir"], "model_card.json"))
    metrics = card.get("metrics", {})
    evaluation = summary["report"].get("evaluation") or {}
    threshold = summary["match"]["threshold"]
    lines = [
        "",
        "siamese-dedup demo: done",
        f"  model {card['model_id']}  seed-protocol ROC AUC {metrics.get('seed_protocol_auc', float('nan')):.4f}  "
        f"recall@1 {metrics.get('recall_at_1', float('nan')):.4f}",
        f"  catalogue {summary['catalogue']['items']} files, {summary['catalogue']['planted_pairs']} planted "
        f"duplicate pairs, {summary['catalogue']['broken_items']} broken files",
        f"  embedded {summary['embed']['embedded']}, failures {summary['embed']['failed']}",
        f"  threshold {threshold['angular_similarity']:.4f} angular ({threshold['source']})",
        f"  matched pairs {summary['match']['pairs']}, clusters {summary['dedup']['clusters_count']}, "
        f"items to drop {summary['dedup']['items_to_drop']}",
    ]
    if evaluation:
        def rate(value):  # precision is undefined (None) when nothing was predicted
            return "n/a" if value is None else f"{value:.4f}"

        lines.append(
            f"  planted duplicates: precision {rate(evaluation['precision'])} "
            f"({evaluation['found_pairs']} of {evaluation['predicted_pairs']} predicted pairs)  "
            f"recall {rate(evaluation['recall'])} ({evaluation['found_pairs']} of {evaluation['planted_pairs']})"
        )
    lines.append("  wall time (s): " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    lines.append("  outputs:")
    paths = {
        "model": summary["model_dir"],
        "catalogue": os.path.dirname(summary["catalogue"]["image_glob"]),
        "ground truth": summary["catalogue"]["ground_truth_csv"],
        "templates": summary["embed"]["templates"],
        "failures": summary["embed"]["failures"],
        "matches": summary["match"]["matches"],
        "clusters": summary["dedup"]["clusters"],
        "report.json": summary["report"]["report_json"],
        "report.html": summary["report"]["report_html"],
        "summary": os.path.join(out, "demo_summary.json"),
    }
    lines += [f"    {name:<13} {path}" for name, path in paths.items()]
    return "\n".join(lines)
