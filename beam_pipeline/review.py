"""The review loop: a person labels the pairs near the threshold, and the next run uses what they said.

    siamese-dedup review export --workdir D [--pairs 100] [--output D/review]
    siamese-dedup review import LABELS --workdir D [--output D/review]
    siamese-dedup match ... --review_threshold D/review/review_threshold.json
    siamese-dedup train ... --hard_negatives D/review/hard_negatives.csv

`export` writes the pairs a person should judge, the weakest matches and the strongest pairs left out
(half each), as review/pairs.csv and review/pairs.parquet (REVIEW_PAIRS_SCHEMA: ids, score, side, image
URIs, an empty `label`) and review/review.html (each pair's two thumbnails inline, with its score).
The person fills `label` with `duplicate` or `distinct` (blank: not judged).

`import` reads the labelled CSV or Parquet back (checked against the export: same pairs, same model),
recalibrates the threshold on it (`recalibrate`), and writes
- review/review_threshold.json (schemas.documents.REVIEW_THRESHOLD_SCHEMA): the new threshold in the run's
  score with the counts behind it, which `match --review_threshold` takes (stated in match_run.json and the
  report as source "review");
- review/hard_negatives.csv: the pairs confirmed distinct (`train --hard_negatives`).
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import io as _io
import logging
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import io as bio
from beam_pipeline import report_figures, score_distribution
from schemas.documents import validate_match_run, validate_review_threshold
from schemas.tables import REVIEW_PAIRS_SCHEMA, SchemaError, embeddings_as_numpy, validate_table
from siamese_core.error_rates import rate_interval_95

LOG = logging.getLogger(__name__)
LABELS = ("duplicate", "distinct")  # what a person writes in `label`; blank = not judged
# What match_run.json's threshold.review states of a review_threshold.json (match --review_threshold).
STATED = ("labels", "from_run_id", "previous", "labelled_pairs", "duplicates", "distinct", "errors",
          "precision_labelled", "precision_labelled_95", "rule")
DEFAULT_PAIRS = 100


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="siamese-dedup review", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write the pairs near the threshold for a person to label")
    exp.add_argument("--workdir", required=True, help="work directory of a match + dedup run")
    exp.add_argument("--pairs", type=int, default=DEFAULT_PAIRS,
                     help=f"pairs to write, half above and half below the threshold (default {DEFAULT_PAIRS})")
    exp.add_argument("--output", default=None, help="where to write (default WORKDIR/review)")
    imp = sub.add_parser("import", help="read the labelled pairs, recalibrate the threshold, write hard negatives")
    imp.add_argument("labels", help="the labelled pairs.csv or pairs.parquet (label: duplicate | distinct | blank)")
    imp.add_argument("--workdir", required=True, help="the work directory the pairs were exported from")
    imp.add_argument("--output", default=None, help="where to write (default WORKDIR/review)")
    return parser


# ----------------------------------------------------------------------------------------------- export

def borderline_pairs(workdir: str, count: int) -> tuple[list[dict], dict]:
    """The `count` pairs nearest the run's threshold: the count // 2 weakest matches and the strongest
    pairs below it (the rest, from every pair's score, beam_pipeline.score_distribution).
    Returns (rows of REVIEW_PAIRS_SCHEMA without labels, the run's threshold dict from match_run.json)."""
    if count < 2:
        raise ValueError(f"--pairs must be at least 2 (one above, one below the threshold), got {count}")
    run_path = FileSystems.join(workdir, "match_run.json")
    run_doc = validate_match_run(bio.read_json(run_path), run_path)
    if (run_doc.get("mode") or "all_pairs") != "all_pairs":
        raise ValueError(f"review export is for all_pairs runs (one catalogue); this run is {run_doc.get('mode')}")
    threshold = run_doc["threshold"]
    templates = bio.read_table_dir(workdir, "templates")
    matches = bio.read_table_dir(workdir, "matches")
    ids, uris = templates.column("item_id").to_pylist(), templates.column("source_uri").to_pylist()
    index = {x: k for k, x in enumerate(ids)}
    emb = embeddings_as_numpy(templates)
    n_above = count // 2
    dist = score_distribution.run_score_distribution(emb, threshold, borderline=count - n_above)
    score = matches.column("score").to_numpy().astype(np.float64)
    weakest = np.argsort(score, kind="stable")[:n_above]
    left, right = matches.column("left_id").to_pylist(), matches.column("right_id").to_pylist()
    rows = [(left[k], right[k], float(score[k]), "above") for k in weakest]
    rows += [(ids[i], ids[j], s, "below") for i, j, s in dist.borderline]
    out = []
    for a, c, s, side in rows:
        a, c = (a, c) if a < c else (c, a)
        out.append({"left_id": a, "right_id": c, "score": s, "side": side, "left_uri": uris[index[a]],
                    "right_uri": uris[index[c]], "model_id": run_doc.get("model_id", ""),
                    "run_id": run_doc.get("run_id", ""), "label": ""})
    return out, threshold


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _thumb_uri(uri: str) -> str:
    """A thumbnail of the image as an inline PNG data URI (a grey square when it cannot be read)."""
    from PIL import Image

    pixels = report_figures.read_thumbnail(uri)
    if pixels is None:
        pixels = np.full((report_figures.THUMB_PIXELS, report_figures.THUMB_PIXELS, 3), 200, np.uint8)
    buf = _io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def review_html(rows: list[dict], threshold: dict) -> str:
    """A self-contained page: each pair's two thumbnails with its score and which side of the threshold."""
    cards = []
    for n, r in enumerate(rows, 1):
        cards.append(
            f"<div class='pair'><div class='imgs'><img alt='{html.escape(r['left_id'])}' src='{_thumb_uri(r['left_uri'])}'>"
            f"<img alt='{html.escape(r['right_id'])}' src='{_thumb_uri(r['right_uri'])}'></div>"
            f"<p>#{n} <b>{r['score']:.4f}</b> ({r['side']})<br><code>{html.escape(r['left_id'])}</code><br>"
            f"<code>{html.escape(r['right_id'])}</code></p></div>")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'><title>siamese-dedup review</title>"
        "<style>body{font-family:sans-serif;margin:1em;color:#222}.grid{display:flex;flex-wrap:wrap;gap:0.8em}"
        ".pair{border:1px solid #ccc;padding:0.4em;width:210px}.imgs img{width:96px;height:96px;margin:2px}"
        "code{font-size:11px;word-break:break-all}p{margin:0.3em 0;font-size:13px}</style></head><body>"
        f"<h1>Pairs to review</h1><p>Threshold {threshold['value']:.6f} "
        f"({html.escape(threshold.get('score', 'angular_similarity').replace('_', ' '))}, source "
        f"<code>{html.escape(str(threshold.get('source')))}</code>). For each pair, write <code>duplicate</code> or "
        "<code>distinct</code> in the <code>label</code> column of pairs.csv (same order, numbered here), then run "
        "<code>siamese-dedup review import pairs.csv --workdir ...</code>.</p>"
        f"<div class='grid'>{''.join(cards)}</div></body></html>")


def export(workdir: str, count: int = DEFAULT_PAIRS, output: str | None = None) -> dict:
    """Write pairs.csv, pairs.parquet and review.html under `output` (default WORKDIR/review)."""
    rows, threshold = borderline_pairs(workdir, count)
    out = output or FileSystems.join(workdir, "review")
    if not out.startswith("gs://"):
        os.makedirs(out, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=REVIEW_PAIRS_SCHEMA)
    paths = {"csv": FileSystems.join(out, "pairs.csv"), "parquet": FileSystems.join(out, "pairs.parquet"),
             "html": FileSystems.join(out, "review.html")}
    bio.write_text(paths["csv"], _csv_text(rows, REVIEW_PAIRS_SCHEMA.names), "text/csv")
    with FileSystems.create(paths["parquet"], compression_type=CompressionTypes.UNCOMPRESSED) as f:
        pq.write_table(table, f)
    bio.write_text(paths["html"], review_html(rows, threshold), "text/html")
    LOG.info("review: %d pairs -> %s", len(rows), paths["html"])
    return {"pairs": len(rows), "above": sum(r["side"] == "above" for r in rows),
            "below": sum(r["side"] == "below" for r in rows), **paths}


# ----------------------------------------------------------------------------------------------- import

def read_labels(path: str) -> pa.Table:
    """The labelled pairs (CSV or Parquet by extension) as a REVIEW_PAIRS_SCHEMA table; labels lower-cased
    and stripped. Raises ValueError for missing columns or a label other than duplicate/distinct/blank."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        data = f.read()
    if path.endswith(".parquet"):
        table = pq.read_table(pa.BufferReader(data))
    else:
        reader = csv.DictReader(_io.StringIO(data.decode("utf-8-sig")))
        missing = set(REVIEW_PAIRS_SCHEMA.names) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: the labelled pairs need the exported columns; missing {sorted(missing)}")
        rows = list(reader)
        for r in rows:
            try:
                r["score"] = float(r["score"])
            except ValueError:
                raise ValueError(f"{path}: score {r['score']!r} of pair {r['left_id']}, {r['right_id']} is not a "
                                 "number") from None
        table = pa.Table.from_pylist(rows, schema=REVIEW_PAIRS_SCHEMA)
    missing = sorted(set(REVIEW_PAIRS_SCHEMA.names) - set(table.column_names))
    if missing:
        raise ValueError(f"{path}: the labelled pairs need the exported columns; missing {missing}")
    try:  # a spreadsheet or pandas round trip may change types (e.g. an all-blank label column)
        table = table.select(REVIEW_PAIRS_SCHEMA.names).cast(REVIEW_PAIRS_SCHEMA)
        table = validate_table(table, "review_pairs")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, SchemaError) as err:
        raise ValueError(f"{path}: not the exported review pairs: {err}") from None
    labels = [(x or "").strip().lower() for x in table.column("label").to_pylist()]
    bad = sorted({x for x in labels if x and x not in LABELS})
    if bad:
        raise ValueError(f"{path}: label must be one of {', '.join(LABELS)} or blank; found {bad}")
    return table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.string()))


def recalibrate(scores: np.ndarray, duplicate: np.ndarray, previous: float) -> dict:
    """The threshold that best agrees with a person's labels of pairs near the old one.

    scores (n,) in the run's score; duplicate (n,) bool. A threshold t calls a pair a duplicate when its
    score >= t; its errors are the distinct pairs at or above t plus the duplicates below it. Among the
    thresholds with the fewest errors (an interval between two labelled scores), the one nearest
    `previous`: `previous` itself when it is in that interval, else the interval's end nearest to it.
    Returns {"value", "errors",
    "distinct_at_or_above", "duplicates_below", "labelled_above", "precision_labelled",
    "precision_labelled_95"}.
    """
    scores, duplicate = np.asarray(scores, np.float64), np.asarray(duplicate, bool)
    if not len(scores):
        raise ValueError("no pair was labelled duplicate or distinct: nothing to recalibrate on")
    # Candidate cuts: every labelled score (the pair at it matches) and one just above the top one.
    cuts = np.unique(np.append(scores, np.nextafter(scores.max(), np.inf)))
    errors = np.array([int(((scores >= t) & ~duplicate).sum() + ((scores < t) & duplicate).sum()) for t in cuts])
    # Every t in (cuts[m-1], cuts[m]] matches the same labelled pairs as cuts[m]: take, among the best
    # candidates' intervals, the value nearest the previous threshold.
    options = []
    for m in np.nonzero(errors == errors.min())[0]:
        lo = np.nextafter(cuts[m - 1], np.inf) if m > 0 else -np.inf
        t = float(np.clip(previous, lo, cuts[m]))
        options.append((abs(t - previous), t))
    value = float(min(options)[1])
    above = scores >= value
    tp, n_above = int((above & duplicate).sum()), int(above.sum())
    low, high = rate_interval_95(tp, n_above) if n_above else (None, None)
    return {"value": value, "errors": int(((above & ~duplicate).sum() + (~above & duplicate).sum())),
            "distinct_at_or_above": int((above & ~duplicate).sum()), "duplicates_below": int((~above & duplicate).sum()),
            "labelled_above": n_above, "precision_labelled": tp / n_above if n_above else None,
            "precision_labelled_95": None if low is None else [low, high]}


def import_labels(labels_path: str, workdir: str, output: str | None = None) -> dict:
    """Read the labels, write review_threshold.json and hard_negatives.csv; returns the threshold doc."""
    run_path = FileSystems.join(workdir, "match_run.json")
    run_doc = validate_match_run(bio.read_json(run_path), run_path)
    threshold = run_doc["threshold"]
    table = read_labels(labels_path)
    models = set(table.column("model_id").to_pylist())
    if models - {run_doc.get("model_id")}:
        raise ValueError(f"{labels_path}: pairs of model(s) {sorted(models)}, the work directory's run used model "
                         f"{run_doc.get('model_id')}: export the pairs again from this run")
    labels = np.asarray(table.column("label").to_pylist(), dtype=object)
    judged = labels != ""
    scores = table.column("score").to_numpy()[judged]
    duplicate = labels[judged] == "duplicate"
    result = recalibrate(scores, duplicate, float(threshold["value"]))
    out = output or FileSystems.join(workdir, "review")
    if not out.startswith("gs://"):
        os.makedirs(out, exist_ok=True)
    distinct_rows = [r for r, lab in zip(table.to_pylist(), labels) if lab == "distinct"]
    negatives_path = FileSystems.join(out, "hard_negatives.csv")
    bio.write_text(negatives_path, _csv_text(distinct_rows, ["left_id", "right_id", "left_uri", "right_uri", "score",
                                                          "label"]), "text/csv")
    doc = {
        "model_id": run_doc.get("model_id", ""),
        "value": result["value"],
        "score": threshold.get("score", "angular_similarity"),
        "knn": threshold.get("knn"),
        "labels": labels_path,
        "from_run_id": run_doc.get("run_id", ""),
        "previous": {"value": float(threshold["value"]), "source": threshold.get("source", "")},
        "labelled_pairs": int(judged.sum()),
        "duplicates": int(duplicate.sum()),
        "distinct": int((~duplicate).sum()),
        "unlabelled": int((~judged).sum()),
        **{k: result[k] for k in ("errors", "distinct_at_or_above", "duplicates_below", "labelled_above",
                                  "precision_labelled", "precision_labelled_95")},
        "rule": "the threshold with the fewest disagreements with the labels (distinct pairs at or above it plus "
                "duplicates below it), nearest the previous threshold among equals",
        "hard_negatives": negatives_path,
    }
    validate_review_threshold(doc)
    path = FileSystems.join(out, "review_threshold.json")
    bio.write_json(path, doc)
    LOG.info("review: threshold %.6f (was %.6f) from %d labelled pairs -> %s", doc["value"],
             doc["previous"]["value"], doc["labelled_pairs"], path)
    return {**doc, "review_threshold": path}


def load_review_threshold(path: str) -> dict:
    """review_threshold.json, validated (match --review_threshold reads it before the templates, and checks
    it against their model with `check_review_model` once they are staged)."""
    return validate_review_threshold(bio.read_json(path))


def check_review_model(doc: dict, path: str, model_id: str) -> dict:
    """`doc` (read from review_threshold.json `path`) if it was calibrated for `model_id` (an empty catalogue
    has none: nothing to check); ValueError otherwise: a threshold means nothing for another model's scores."""
    if model_id and doc["model_id"] != model_id:
        raise ValueError(f"--review_threshold {path} was calibrated for model {doc['model_id']}; the templates are "
                         f"of model {model_id}")
    return doc


def run(argv=None) -> dict:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "export":
        return export(args.workdir, args.pairs, args.output)
    return import_labels(args.labels, args.workdir, args.output)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    print(run())
