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


def _encoded(pixels: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    """The bytes of `pixels` saved as an image file of format `fmt` (PIL's save options in `save`)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save)
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
        truncated = _encoded(images[0])[:40]
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
            f.write(_encoded(pixels))
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
        broken_payloads = [("truncated_jpeg", _encoded(photos[0], "JPEG", quality=90)[:300]), *BROKEN_FILES.items()]
    order = rng.permutation(len(entries) + len(broken_payloads))
    names = [f"item_{k:06d}.jpg" for k in order]
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    planter = CopyPlanter()
    groups: dict[int, list[str]] = {}
    manifest_rows = []
    for (source, copy, family), name in zip(entries, names):
        if copy == 0:
            payload = _encoded(photos[source], "JPEG", quality=92)
        else:
            payload = _encoded(planter(photos[source], family, rng), "JPEG", quality=95)
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
    from beam_pipeline.clustering import DEFAULT_LINKAGE, LINKAGES

    parser = argparse.ArgumentParser(
        prog="siamese-dedup demo",
        description="The whole job end to end on the DirectRunner, twice: Fashion-MNIST (train, embed the test "
        "split with planted near-duplicates, match, deduplicate, report) and a photo catalogue built from "
        "Debian's image packages with planted edited copies (an encoder trained on the catalogue itself).",
    )
    parser.add_argument("--output", default="demo_output", help="Directory for every output (default demo_output).")
    parser.add_argument("--parts", default="fashion_mnist,photos",
                        help="Which parts to run, comma-separated: fashion_mnist, photos (default both).")
    parser.add_argument(
        "--model_dir", default=None, help="Fashion-MNIST: use this trained encoder artefact instead of training one."
    )
    parser.add_argument("--epochs", type=int, default=None, help="Fashion-MNIST training epochs (default: the trainer's).")
    parser.add_argument(
        "--max_train_items", type=int, default=None, help="Fashion-MNIST: train on at most this many images (quick runs)."
    )
    parser.add_argument(
        "--catalogue_size", type=int, default=None, help="Fashion-MNIST: use the first N test images (default: all 10,000)."
    )
    parser.add_argument("--planted", type=int, default=500, help="Fashion-MNIST: originals that get augmented copies (default 500).")
    parser.add_argument("--max_copies", type=int, default=2, help="Fashion-MNIST: copies per planted original: 1..N (default 2).")
    parser.add_argument("--photo_items", type=int, default=PHOTO_ITEMS,
                        help="Photos: distinct originals in the catalogue (default 0: one tile of every photograph "
                        "of the corpus's held-out packages).")
    parser.add_argument("--photo_model_dir", default=None,
                        help="Photos: use this encoder instead of training one on the catalogue (--preset catalogue).")
    parser.add_argument("--photo_train_args", default="",
                        help="Photos: extra flags for the catalogue training, e.g. '--epochs 10' (quick runs).")
    parser.add_argument("--threshold", type=float, default=None,
                        help="Match threshold in angular similarity (default: self-calibrated per catalogue).")
    parser.add_argument("--target_fmr", type=float, default=None,
                        help="Use the model card's threshold at this FMR instead of self-calibration.")
    parser.add_argument(
        "--linkage", default=DEFAULT_LINKAGE, choices=LINKAGES,
        help="Dedup clusters: complete (default: every two members of a cluster match, so no item is "
        "dropped on the strength of a chain) or single (connected components, chains flagged).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the catalogues and training (default 0).")
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST IDX directory (default: the Debian package's).")
    return parser


PARTS = ("fashion_mnist", "photos")
REVIEW_PAIRS = 48  # pairs near the threshold written for review, half above and half below
PHOTO_ITEMS = 0  # 0: one tile of every photograph of the held-out packages (272 from endless-sky-data)


def _timed(timings: dict, stage: str, fn, *args):
    log.info("==> %s", stage)
    start = time.perf_counter()
    result = fn(*args)
    timings[stage] = round(time.perf_counter() - start, 2)
    log.info("<== %s done in %.1f s", stage, timings[stage])
    return result


def _dedup_job(catalogue: Catalogue, model_dir: str, out: str, args, run_id: str, timings: dict,
               prefix: str = "") -> dict:
    """embed -> match -> dedup -> report of one catalogue into `out`; the stage summaries."""
    from beam_pipeline import dedup, embed, match, report, review

    common = ["--run_id", run_id]
    embed_summary = _timed(
        timings, prefix + "embed", embed.run,
        ["--input", catalogue.image_glob, "--model_dir", model_dir, "--output", out, *common],
    )
    threshold_flags = []
    if args.threshold is not None:
        threshold_flags = ["--threshold", str(args.threshold)]
    elif args.target_fmr is not None:
        threshold_flags = ["--target_fmr", str(args.target_fmr)]
    templates_glob = os.path.join(out, "templates", "*.parquet")
    match_summary = _timed(
        timings, prefix + "match", match.run,
        ["--templates", templates_glob, "--model_dir", model_dir, "--output", out, *threshold_flags, *common],
    )
    dedup_summary = _timed(
        timings, prefix + "dedup", dedup.run,
        ["--templates", templates_glob, "--matches", os.path.join(out, "matches", "*.parquet"),
         "--output", out, "--linkage", args.linkage, *common],
    )
    report_summary = _timed(
        timings, prefix + "report", report.run,
        ["--workdir", out, "--model_dir", model_dir, "--ground_truth", catalogue.ground_truth_csv,
         "--manifest", catalogue.manifest_csv, "--linkage", args.linkage],
    )
    # The pairs a person would label to recalibrate the threshold (siamese-dedup review import).
    review_summary = _timed(timings, prefix + "review export", review.export, out, REVIEW_PAIRS)
    accounted = embed_summary["embedded"] + embed_summary["failed"]
    if accounted != catalogue.items:
        raise RuntimeError(
            f"{catalogue.items} catalogue files but {accounted} templates + failures: items were lost"
        )
    return {"model_dir": model_dir, "catalogue": dataclasses.asdict(catalogue), "embed": embed_summary,
            "match": match_summary, "dedup": dedup_summary, "report": report_summary, "review": review_summary}


def photo_tiles(n: int, seed: int = 0) -> np.ndarray:
    """`n` distinct photo tiles (uint8 (n, 256, 256, 3)) from the corpus's held-out packages
    (trainer.photo_corpus.DEFAULT_SPLIT), chosen with the seed: at most one tile per photograph and scale,
    because two neighbouring tiles of one texture (gravel, sand, a dome's ribs) look like copies of each
    other though the ground truth would call them distinct."""
    from trainer import photo_corpus

    tiles, origins = photo_corpus.tile_photos(photo_corpus.photo_files(photo_corpus.DEFAULT_SPLIT["heldout"]))
    rng = np.random.default_rng(seed)
    by_photo_scale: dict = {}
    for k in rng.permutation(len(tiles)):
        by_photo_scale.setdefault((origins[k].file, origins[k].scale), int(k))
    keep = np.array(sorted(by_photo_scale.values()), np.int64)
    if n > len(keep):
        raise ValueError(f"--photo_items {n}: the corpus's held-out packages give {len(keep)} tiles "
                         "(one per photograph and scale)")
    return tiles[keep] if n == 0 else tiles[np.sort(rng.choice(keep, n, replace=False))]


def run(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the summary dict it also writes to OUTPUT/demo_summary.json."""
    import shlex

    from beam_pipeline.options import new_run_id
    from trainer import train
    from trainer.data import load_fashion_mnist

    args = build_parser().parse_args(argv)
    # Before any stage starts TensorFlow, so both trainings are reproducible whichever parts run.
    train.pin_op_threads(True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        build_parser().error(f"--parts takes a comma-separated subset of {', '.join(PARTS)}; got {args.parts!r}")
    out = os.path.abspath(args.output)
    os.makedirs(out, exist_ok=True)
    run_id = new_run_id()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    summary: dict = {"run_id": run_id, "seconds": timings}

    if "fashion_mnist" in parts:
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
        summary.update(train=train_summary, **_dedup_job(catalogue, model_dir, out, args, run_id, timings))

    if "photos" in parts:
        photo_out = os.path.join(out, "photos")
        tiles = _timed(timings, "photos: tiles", photo_tiles, args.photo_items, args.seed)
        catalogue = _timed(timings, "photos: catalogue", lambda: write_photo_catalogue(
            tiles, os.path.join(photo_out, "catalogue"), seed=args.seed))
        photo_model = args.photo_model_dir
        photo_train = None
        if photo_model is None:
            photo_model = os.path.join(photo_out, "model")
            photo_train = _timed(timings, "photos: train", train.run, [
                "--data", "unlabelled", "--data_path", os.path.dirname(catalogue.image_glob), "--preset", "catalogue",
                "--output", photo_model, "--seed", str(args.seed), *shlex.split(args.photo_train_args)])
        summary["photos"] = {"train": photo_train, **_dedup_job(catalogue, photo_model, photo_out, args, run_id,
                                                                 timings, prefix="photos: ")}
    timings["total"] = round(time.perf_counter() - started, 2)
    with open(os.path.join(out, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(format_summary(summary, out))
    return summary


def _rate(value) -> str:  # precision is undefined (None) when nothing was predicted
    return "n/a" if value is None else f"{value:.4f}"


def _job_lines(job: dict) -> list[str]:
    """The figures of one catalogue's run: threshold and how it was chosen, counts, planted-duplicate scores."""
    threshold = job["match"]["threshold"]
    lines = [
        f"  catalogue {job['catalogue']['items']} files, {job['catalogue']['planted_pairs']} planted "
        f"duplicate pairs, {job['catalogue']['broken_items']} broken files",
        f"  embedded {job['embed']['embedded']}, failures {job['embed']['failed']}",
        f"  threshold {threshold['value']:.4f} {threshold['score'].replace('_', ' ')} ({threshold['source']})",
    ]
    cal = threshold.get("self_calibration")
    if cal:
        lo, hi = cal["expected_false_pairs_ci95"]
        recall = (cal.get("expected_copy_recall") or {}).get("estimate")
        lines.append(f"    chosen for {cal['budget']}: expected false pairs {cal['expected_false_pairs']:.2f} "
                     f"(95% {lo:.2f}-{hi:.2f}) of ~{cal['predicted_pairs']:.0f} predicted; synthetic copies "
                     f"found {_rate(recall)}")
        lines += [f"    note: {note}" for note in cal.get("notes") or []]
    lines.append(f"  matched pairs {job['match']['pairs']}, clusters {job['dedup']['clusters_count']}, "
                 f"items to drop {job['dedup']['items_to_drop']}")
    evaluation = job["report"].get("evaluation") or {}
    for level, key in (("matched pairs", "pairs"), ("clusters", "clusters")):
        x = evaluation.get(key)
        if x:
            lines.append(f"  planted duplicates, {level}: precision {_rate(x['precision'])}  recall "
                         f"{_rate(x['recall'])}  F1 {_rate(x['f1'])}  ({x['found_pairs']} found of "
                         f"{x['predicted_pairs']} predicted, {x['planted_pairs']} planted)")
    return lines


def format_summary(summary: dict, out: str) -> str:
    """The short text the demo prints: figures, timings and every output path."""
    from beam_pipeline.io import read_json

    lines = ["", "siamese-dedup demo: done"]
    paths = {}
    for name, job in (("Fashion-MNIST", summary if "embed" in summary else None), ("photos", summary.get("photos"))):
        if not job:
            continue
        card = read_json(os.path.join(job["model_dir"], "model_card.json"))
        metrics = card.get("metrics", {})
        lines.append(f" {name}: model {card['model_id']}  "
                     + (f"seed-protocol ROC AUC {metrics.get('seed_protocol_auc', float('nan')):.4f}  "
                        f"recall@1 {metrics.get('recall_at_1', float('nan')):.4f}" if name == "Fashion-MNIST" else
                        f"trained on the catalogue itself in {card['training'].get('train_seconds', 0):.0f} s"))
        lines += _job_lines(job)
        tag = "" if name == "Fashion-MNIST" else "photos "
        paths.update({
            f"{tag}model": job["model_dir"],
            f"{tag}catalogue": os.path.dirname(job["catalogue"]["image_glob"]),
            f"{tag}ground truth": job["catalogue"]["ground_truth_csv"],
            f"{tag}templates": job["embed"]["templates"],
            f"{tag}failures": job["embed"]["failures"],
            f"{tag}matches": job["match"]["matches"],
            f"{tag}clusters": job["dedup"]["clusters"],
            f"{tag}report.json": job["report"]["report_json"],
            f"{tag}report.html": job["report"]["report_html"],
            f"{tag}review pairs": job["review"]["html"],
        })
    paths["summary"] = os.path.join(out, "demo_summary.json")
    lines.append("  wall time (s): " + ", ".join(f"{k} {v}" for k, v in summary["seconds"].items()))
    lines.append("  outputs:")
    lines += [f"    {name:<20} {path}" for name, path in paths.items()]
    return "\n".join(lines)
