"""What the review loop buys: a person labels the pairs near the threshold, the threshold is recalibrated,
and the catalogue is matched again; F1 against the planted duplicates before and after.

    .venv/bin/python bench/bench_review.py --workdir demo_output/photos --model_dir demo_output/photos/model \
        --catalogue demo_output/photos/catalogue [--pairs 48]

The "person" is the ground truth (a perfect labeller): each exported pair is labelled duplicate when the
planted groups say so. WORKDIR is a finished embed/match/dedup run (e.g. `make demo`'s photos); the rerun
goes to WORKDIR/../review_bench/ (match with --review_threshold, dedup with the run's linkage, report).
Prints one JSON line: the threshold and the pair/cluster precision, recall and F1 before and after.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _scores(report_json: str) -> dict:
    with open(report_json) as f:
        ev = json.load(f)["evaluation"]
    return {level: {k: ev[level][k] for k in ("precision", "recall", "f1", "found_pairs", "predicted_pairs")}
            for level in ("pairs", "clusters")}


def main(argv=None) -> dict:
    from beam_pipeline import dedup, match, report, report_metrics, review

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--catalogue", required=True, help="CAT: ground_truth.csv and manifest.csv")
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--linkage", default="complete")
    args = parser.parse_args(argv)
    truth_csv = os.path.join(args.catalogue, "ground_truth.csv")
    manifest = os.path.join(args.catalogue, "manifest.csv")
    report_args = ["--model_dir", args.model_dir, "--ground_truth", truth_csv, "--manifest", manifest,
                   "--linkage", args.linkage]
    report.run(["--workdir", args.workdir, *report_args])
    before = _scores(os.path.join(args.workdir, "report.json"))

    rerun = os.path.join(os.path.dirname(os.path.abspath(args.workdir)), "review_bench")
    shutil.rmtree(rerun, ignore_errors=True)
    exported = review.export(args.workdir, args.pairs, os.path.join(rerun, "review"))
    with open(truth_csv) as f:
        planted = report_metrics.read_ground_truth(f.read())
    with open(exported["csv"]) as f:
        rows = list(csv.DictReader(f))
    ids = sorted({r[k] for r in rows for k in ("left_id", "right_id")} | {x for p in planted for x in p})
    truth = report_metrics.GroundTruth(ids, planted)
    index = {x: k for k, x in enumerate(ids)}
    for r in rows:
        same = truth.same_group([index[r["left_id"]]], [index[r["right_id"]]])[0]
        r["label"] = "duplicate" if same else "distinct"
    labels = os.path.join(rerun, "review", "labelled.csv")
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    doc = review.import_labels(labels, args.workdir, os.path.join(rerun, "review"))

    templates = os.path.join(args.workdir, "templates", "*.parquet")
    match.run(["--templates", templates, "--model_dir", args.model_dir, "--output", rerun,
               "--review_threshold", doc["review_threshold"]])
    dedup.run(["--templates", templates, "--matches", os.path.join(rerun, "matches", "*.parquet"),
               "--output", rerun, "--linkage", args.linkage])
    os.symlink(os.path.abspath(os.path.join(args.workdir, "templates")), os.path.join(rerun, "templates"))
    if os.path.isdir(os.path.join(args.workdir, "failures")):
        os.symlink(os.path.abspath(os.path.join(args.workdir, "failures")), os.path.join(rerun, "failures"))
    report.run(["--workdir", rerun, *report_args])
    after = _scores(os.path.join(rerun, "report.json"))
    result = {"bench": "review", "workdir": args.workdir, "pairs_labelled": doc["labelled_pairs"],
              "duplicates": doc["duplicates"], "distinct": doc["distinct"],
              "threshold_before": doc["previous"], "threshold_after": doc["value"],
              "errors_at_new_threshold": doc["errors"], "before": before, "after": after}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
