"""Near-duplicate detection on a photo catalogue with planted copies: our pipeline beside imagededup and fastdup.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_neardup.py --catalogue CAT \\
        (--project_model MODEL_DIR | --project_train [--train_args '--preset catalogue'] [--project_model OUT]) \\
        [--project_threshold T] [--work /tmp/bench_neardup] [--json results.json] [--peers phash,...,fastdup]

Long runs (training, big catalogues) go behind `flock /tmp/heavy.lock` as above: the machine is shared.

The catalogue CAT: CAT/images/<item_id> (JPEG / PNG, some broken), CAT/ground_truth.csv (left_id,right_id:
every pair of copies of one original, groups closed), CAT/manifest.csv (item_id, source_index, label,
copy_number, broken, edit: the edit family of a copy; empty for originals).

Methods, each scored on pairs of items:
- ours: the Beam stages run in this process (beam_pipeline.embed, match with the model card's own
  threshold unless --project_threshold, dedup at its default linkage). Predicted pairs = every pair of
  items in one cluster of W/ours/clusters/*.parquet, and also the matched pairs themselves; a second
  match run at --sweep_floor (angular similarity) gives every pair for the threshold sweep.
  The model: --project_model DIR, or --project_train to train one on the catalogue itself
  (`python -m trainer.train --data unlabelled --data_path CAT/images --output M` + --train_args).
  Beside them (catalogues up to LINKAGE_MAX_ITEMS templates): clusters by complete, average and weighted
  linkage over all pairs at our threshold (linkage_rows), and the raw and kNN-normalised scores at their
  oracle thresholds (knn_rows). Self-calibration is checked at its threshold and along its whole curve
  (false_pairs_along_curve: stated against true false pairs).
- imagededup PHash, DHash, WHash, AHash (bench/peers.py): Hamming distances of all pairs within --hash_cap
  from one hashing pass; at imagededup's default distance 10 and at the best distance 0..cap.
- fastdup (bench/peers.py): at its defaults (k=2 nearest neighbours, similarity >= 0.9; and its connected
  components at cc_threshold 0.96, its near-duplicate groups); and with --fastdup_k neighbours down to
  --fastdup_floor for its default threshold 0.9 with more neighbours and the best threshold.
Each peer runs in its own process (`python bench/peers.py METHOD ...`, --peers_python to use another
interpreter); a peer that is not installed is reported with the install command and skipped.

Scoring (the same for every method):
- truth = the planted pairs of ground_truth.csv; the items scored are the manifest's non-broken items:
  predicted pairs with a broken or unknown item are dropped (counted per method);
- overall pair precision, recall, F1 (errors = 1 - F1);
- per edit family f: truth_f = planted pairs with at least one item whose edit is f (a copy of that
  family); predicted_f = predicted pairs with at least one item whose edit is f; P/R/F1 of predicted_f
  against truth_f (a pair of two copies of different families counts for both);
- "best" thresholds maximise overall F1 on this very catalogue using its ground truth: an oracle, an upper
  bound for a threshold chosen without the answers. Per family figures of a "best" row are at that one
  threshold.
- wall seconds of each method's work (ours: embed + match + dedup; training and the sweep's match run
  reported apart; peers: the tool's own call, and the process around it), and the files it skipped.
The ratio of our errors to the best peer's (the smallest 1 - F1 among the peers' rows): default
(ours at its own threshold vs peers at their defaults) and best (each at its oracle threshold); the target
is ours <= 0.5 x the best peer's.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS_SCRIPT = os.path.join(ROOT, "bench", "peers.py")
INSTALL = "pip install --no-deps imagededup==0.3.3.post2 fastdup==2.54 && pip install -e '.[neardup]'"
HASH_METHODS = ("phash", "dhash", "whash", "ahash")
PEER_METHODS = HASH_METHODS + ("fastdup",)
IMAGEDEDUP_DEFAULT_DISTANCE = 10
FASTDUP_DEFAULT_THRESHOLD = 0.9
TARGET_RATIO = 0.5
KNN_SWEEP_SPAN = 0.3  # the sweep of a kNN-normalised run starts this far below its own threshold
FAMILY_DEFINITION = (
    "truth_f = planted pairs with at least one item whose edit is f; predicted_f = predicted pairs with at "
    "least one item whose edit is f; precision/recall/F1 of predicted_f against truth_f")
BEST_DEFINITION = ("the threshold that maximises overall pair F1 on this catalogue, chosen with its ground "
                   "truth: an oracle (upper bound)")

Pair = tuple  # (left_id, right_id), left_id < right_id


# --------------------------------------------------------------------------------------------- catalogue

def read_catalogue(cat: str) -> dict:
    """{"manifest": {item_id: row}, "truth": set of pairs, "edit_of": {item_id: edit}, "broken": set,
    "universe": set of scored (non-broken) items, "families": sorted edit families}."""
    with open(os.path.join(cat, "manifest.csv"), newline="") as fh:
        manifest = {row["item_id"]: row for row in csv.DictReader(fh)}
    with open(os.path.join(cat, "ground_truth.csv"), newline="") as fh:
        truth = {canonical_pair(row["left_id"], row["right_id"]) for row in csv.DictReader(fh)}
    broken = {i for i, row in manifest.items() if (row.get("broken") or "").strip()}
    universe = set(manifest) - broken
    edit_of = {i: (row.get("edit") or "").strip() for i, row in manifest.items()}
    families = sorted({edit_of[i] for i in universe if edit_of[i]})
    outside = {p for p in truth if p[0] not in universe or p[1] not in universe}
    if outside:
        logging.warning("%d ground-truth pairs name a broken or unknown item; they are left out", len(outside))
        truth -= outside
    return {"manifest": manifest, "truth": truth, "edit_of": edit_of, "broken": broken, "universe": universe,
            "families": families}


def catalogue_summary(cat: str, c: dict) -> dict:
    copies = [i for i in c["universe"] if c["edit_of"][i]]
    per_family = {f: {"copies": sum(c["edit_of"][i] == f for i in copies),
                      "planted_pairs": len(family_truth(c["truth"], c["edit_of"], f))} for f in c["families"]}
    return {"path": os.path.abspath(cat), "items": len(c["manifest"]), "broken": len(c["broken"]),
            "scored_items": len(c["universe"]), "copies": len(copies), "originals": len(c["universe"]) - len(copies),
            "planted_pairs": len(c["truth"]), "families": per_family}


# ----------------------------------------------------------------------------------------------- scoring

def canonical_pair(a: str, b: str) -> Pair:
    return (a, b) if a < b else (b, a)


def pairs_from_clusters(item_ids: Iterable[str], cluster_ids: Iterable) -> set:
    """Every pair of items that share a cluster id (singletons give none)."""
    members: dict = {}
    for item, cluster in zip(item_ids, cluster_ids):
        members.setdefault(cluster, []).append(item)
    out = set()
    for group in members.values():
        group = sorted(set(group))
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                out.add((a, b))
    return out


def restrict(pairs: Iterable[Pair], universe: set) -> tuple[set, int]:
    """(the pairs whose two items are in `universe`, canonical; how many were dropped)."""
    kept, dropped = set(), 0
    for a, b in pairs:
        if a in universe and b in universe and a != b:
            kept.add(canonical_pair(a, b))
        else:
            dropped += 1
    return kept, dropped


def prf(pred: set, truth: set) -> dict:
    """Pair precision, recall, F1 of `pred` against `truth`. precision is None with no prediction, recall
    None with no truth; F1 = 2 tp / (|pred| + |truth|) (0 when only one of them is empty, None when both)."""
    tp = len(pred & truth)
    return {"precision": tp / len(pred) if pred else None, "recall": tp / len(truth) if truth else None,
            "f1": 2 * tp / (len(pred) + len(truth)) if (pred or truth) else None,
            "tp": tp, "fp": len(pred) - tp, "fn": len(truth) - tp, "predicted": len(pred), "truth": len(truth)}


def _touches(pair: Pair, edit_of: dict, family: str) -> bool:
    return edit_of.get(pair[0]) == family or edit_of.get(pair[1]) == family


def family_truth(truth: set, edit_of: dict, family: str) -> set:
    return {p for p in truth if _touches(p, edit_of, family)}


def per_family(pred: set, truth: set, edit_of: dict, families: Iterable[str]) -> dict:
    """{family: prf(predicted_f, truth_f)} (FAMILY_DEFINITION)."""
    return {f: prf({p for p in pred if _touches(p, edit_of, f)}, family_truth(truth, edit_of, f))
            for f in families}


def threshold_pairs(scored: dict, threshold, higher_is_better: bool) -> set:
    """The pairs whose score is >= threshold (similarities) or <= threshold (distances)."""
    if higher_is_better:
        return {p for p, s in scored.items() if s >= threshold}
    return {p for p, s in scored.items() if s <= threshold}


def sweep(scored: dict, truth: set, higher_is_better: bool, thresholds: Iterable | None = None) -> list[dict]:
    """prf at every threshold (default: every distinct score), strictest first: [{"threshold", **prf}]."""
    ordered = sorted(scored.items(), key=lambda kv: (-kv[1] if higher_is_better else kv[1], kv[0]))
    scores = [s for _, s in ordered]
    cum_tp, tp = [], 0
    for p, _ in ordered:
        tp += p in truth
        cum_tp.append(tp)
    if thresholds is None:
        thresholds = sorted(set(scores), reverse=higher_is_better)
    else:
        thresholds = sorted(set(thresholds), reverse=higher_is_better)
    out, k, n_truth = [], 0, len(truth)
    for t in thresholds:
        while k < len(scores) and (scores[k] >= t if higher_is_better else scores[k] <= t):
            k += 1
        tp = cum_tp[k - 1] if k else 0
        out.append({"threshold": t, "precision": tp / k if k else None, "recall": tp / n_truth if n_truth else None,
                    "f1": 2 * tp / (k + n_truth) if (k or n_truth) else None, "tp": tp, "fp": k - tp,
                    "fn": n_truth - tp, "predicted": k, "truth": n_truth})
    return out


def best_threshold(scored: dict, truth: set, higher_is_better: bool, thresholds: Iterable | None = None):
    """The sweep entry of highest overall F1 (the strictest threshold among ties), or None when nothing
    can be scored (no truth and no pairs)."""
    best = None
    for row in sweep(scored, truth, higher_is_better, thresholds):
        if row["f1"] is not None and (best is None or row["f1"] > best["f1"]):
            best = row
    return best


def errors(f1) -> float | None:
    return None if f1 is None else 1.0 - f1


def error_ratio(ours_f1, peer_f1) -> float | None:
    """(1 - ours F1) / (1 - peer F1); None when undefined (a missing F1, or a perfect peer)."""
    e_ours, e_peer = errors(ours_f1), errors(peer_f1)
    if e_ours is None or e_peer is None or e_peer <= 0:
        return None
    return e_ours / e_peer


def score_row(name: str, kind: str, pred: Iterable[Pair], c: dict, **meta) -> dict:
    """One method's row: overall and per family figures of `pred` (restricted to the scored items)."""
    kept, dropped = restrict(pred, c["universe"])
    row = {"method": name, "kind": kind, **meta, **prf(kept, c["truth"]), "dropped_pairs": dropped,
           "per_family": per_family(kept, c["truth"], c["edit_of"], c["families"])}
    return row


def ratios(rows: list[dict]) -> dict:
    """Our errors over the best peer's: default (ours at its own threshold vs peers' defaults) and best."""
    def pick(kinds, tool_is_ours):
        cands = [r for r in rows if r["kind"] in kinds and (r.get("tool") == "ours") == tool_is_ours
                 and r.get("f1") is not None]
        return max(cands, key=lambda r: r["f1"]) if cands else None

    out = {"target": f"ours <= {TARGET_RATIO} x the best peer's errors (errors = 1 - F1)"}
    for label, ours_kinds, peer_kinds in (("default", ("own",), ("default", "default_threshold")),
                                          ("best", ("best",), ("best",))):
        ours = pick(ours_kinds, True)
        peer = pick(peer_kinds, False)
        ratio = error_ratio(ours and ours["f1"], peer and peer["f1"])
        out[label] = {"ours": ours and ours["method"], "ours_f1": ours and ours["f1"],
                      "best_peer": peer and peer["method"], "best_peer_f1": peer and peer["f1"],
                      "ratio": ratio, "meets_target": None if ratio is None else ratio <= TARGET_RATIO + 1e-9}
    return out


def _fmt(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def markdown_table(rows: list[dict], families: list[str]) -> str:
    head = ["method", "threshold", "P", "R", "F1", "errors", "seconds", "skipped"] + [f"F1 {f}" for f in families]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], _fmt(r.get("threshold"), 4) if isinstance(r.get("threshold"), float)
                 else _fmt(r.get("threshold")), _fmt(r["precision"]), _fmt(r["recall"]), _fmt(r["f1"]),
                 _fmt(errors(r["f1"])), _fmt(r.get("seconds"), 1), _fmt(r.get("skipped"))]
        cells += [_fmt(r["per_family"][f]["f1"], 2) for f in families]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def family_recall_table(rows: list[dict], families: list[str]) -> str:
    head = ["method"] + [f"R {f}" for f in families]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["method"]] + [_fmt(r["per_family"][f]["recall"], 2) for f in families])
                     + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- peers

def run_peer(method: str, image_dir: str, work: str, python: str, args) -> dict:
    """Run bench/peers.py METHOD in its own process; the result (peers.from_json) or {"missing"/"error"}."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import peers  # noqa: E402 (plain functions; imports no peer by itself)

    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, f"{method}.json")
    log = os.path.join(work, f"{method}.log")
    cmd = [python, PEERS_SCRIPT, method, "--image_dir", image_dir, "--out", out,
           "--work", os.path.join(work, method), "--cap", str(args.hash_cap), "--floor", str(args.fastdup_floor),
           "--k", str(args.fastdup_k)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if os.path.exists(out):
        os.remove(out)
    env = dict(os.environ, **peers.FASTDUP_ENV)
    started = time.perf_counter()
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  timeout=args.peer_timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - started
    if rc == 0 and os.path.exists(out):
        with open(out) as fh:
            result = peers.from_json(json.load(fh))
        result["process_seconds"] = round(wall, 3)
        return result
    if os.path.exists(out):
        with open(out) as fh:
            doc = json.load(fh)
        if doc.get("missing"):
            return {"method": method, "missing": doc["missing"], "error": doc.get("error")}
    with open(log, errors="replace") as fh:
        tail = fh.read()[-1500:]
    return {"method": method, "error": f"exit status {rc} after {wall:.0f} s; log {log}; last lines:\n{tail}"}


def peer_rows(results: dict, c: dict, cap: int) -> list[dict]:
    rows = []
    for method in HASH_METHODS:
        r = results.get(method)
        if not r or "pairs" not in r:
            continue
        meta = {"tool": "imagededup", "version": r["version"], "score": r["score"], "seconds": r["seconds"],
                "process_seconds": r.get("process_seconds"), "skipped": len(r["skipped"]),
                "skipped_ids": r["skipped"]}
        d = IMAGEDEDUP_DEFAULT_DISTANCE
        rows.append(score_row(f"{r['method']} @{d} (default)", "default",
                              threshold_pairs(r["pairs"], d, False), c, threshold=d,
                              threshold_rule="Hamming distance <=", **meta))
        kept = {p: s for p, s in r["pairs"].items() if p[0] in c["universe"] and p[1] in c["universe"]}
        best = best_threshold(kept, c["truth"], False, range(cap + 1))
        curve = sweep(kept, c["truth"], False, range(cap + 1))
        if best is not None:
            rows.append(score_row(f"{r['method']} @{best['threshold']} (best, oracle)", "best",
                                  threshold_pairs(r["pairs"], best["threshold"], False), c,
                                  threshold=best["threshold"], threshold_rule="Hamming distance <=",
                                  best_at_cap=best["threshold"] == cap,
                                  sweep=[[x["threshold"], x["precision"], x["recall"], x["f1"]] for x in curve],
                                  **meta))
    fdd, fd = results.get("fastdup_default"), results.get("fastdup")
    if fdd and "pairs" in fdd:
        meta = {"tool": "fastdup", "version": fdd["version"], "score": fdd["score"], "seconds": fdd["seconds"],
                "process_seconds": fdd.get("process_seconds"), "skipped": len(fdd["skipped"]),
                "skipped_ids": fdd["skipped"]}
        rows.append(score_row("fastdup defaults: pairs (k=2, sim >= 0.90)", "default", fdd["pairs"], c,
                              threshold=FASTDUP_DEFAULT_THRESHOLD, threshold_rule="cosine similarity >=",
                              params=fdd["params"], **meta))
        rows.append(score_row("fastdup defaults: components (cc 0.96)", "default", fdd["component_pairs"], c,
                              threshold=fdd["params"].get("cc_threshold"),
                              threshold_rule="connected components of the k=2 graph at similarity >",
                              components=len(fdd.get("components", [])), params=fdd["params"], **meta))
    if fd and "pairs" in fd:
        k = fd["params"]["nearest_neighbors_k"]
        meta = {"tool": "fastdup", "version": fd["version"], "score": fd["score"], "seconds": fd["seconds"],
                "process_seconds": fd.get("process_seconds"), "skipped": len(fd["skipped"]),
                "skipped_ids": fd["skipped"], "params": fd["params"]}
        t = FASTDUP_DEFAULT_THRESHOLD
        rows.append(score_row(f"fastdup k={k} @{t:.2f} (default threshold)", "default_threshold",
                              threshold_pairs(fd["pairs"], t, True), c, threshold=t,
                              threshold_rule="cosine similarity >=", **meta))
        kept = {p: s for p, s in fd["pairs"].items() if p[0] in c["universe"] and p[1] in c["universe"]}
        best = best_threshold(kept, c["truth"], True)
        if best is not None:
            floor = fd["params"]["threshold"]
            rows.append(score_row(f"fastdup k={k} @{best['threshold']:.4f} (best, oracle)", "best",
                                  threshold_pairs(fd["pairs"], best["threshold"], True), c,
                                  threshold=best["threshold"], threshold_rule="cosine similarity >=",
                                  best_at_floor=bool(kept) and best["threshold"] <= min(kept.values()) and floor > -1,
                                  sweep=_grid_curve(kept, c["truth"], floor), **meta))
    return rows


def _grid_curve(scored: dict, truth: set, floor: float, step: float = 0.01) -> list:
    n = int(round((1.0 - floor) / step))
    grid = [round(floor + i * step, 6) for i in range(n + 1)]
    return [[x["threshold"], x["precision"], x["recall"], x["f1"]] for x in sweep(scored, truth, True, grid)]


# -------------------------------------------------------------------------------------------------- ours

def _read_parquet(pattern: str, columns: list[str]) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(glob.glob(pattern))
    tables = [pq.read_table(f, columns=columns) for f in files]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return {c: [] for c in columns}
    table = pa.concat_tables(tables)
    return {c: table.column(c).to_pylist() for c in columns}


def matched_pairs(pattern: str) -> dict:
    """{(left_id, right_id): score} of matches Parquet files (the score match cut: angular similarity, or
    kNN-normalised)."""
    t = _read_parquet(pattern, ["left_id", "right_id", "score"])
    return {canonical_pair(a, b): float(s) for a, b, s in zip(t["left_id"], t["right_id"], t["score"])}


def train_model(cat: str, model_dir: str, train_args: str, log_path: str) -> float:
    cmd = [sys.executable, "-m", "trainer.train", "--data", "unlabelled", "--data_path",
           os.path.join(cat, "images"), "--output", model_dir] + shlex.split(train_args)
    logging.info("training: %s", " ".join(shlex.quote(x) for x in cmd))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if proc.returncode != 0:
        with open(log_path, errors="replace") as fh:
            tail = fh.read()[-2000:]
        raise RuntimeError(f"training failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return time.perf_counter() - started


def false_pairs_along_curve(curve: list[dict], scored: dict, truth: set, floor: float) -> list[dict]:
    """Self-calibration's stated false pairs at each point of its curve (match_run.json's
    threshold.self_calibration.curve: [{"threshold", "predicted_pairs", "expected_false_pairs"}]) beside
    the false pairs the ground truth shows there: the scored pairs `scored` ({pair: score}, in the curve's
    score, every pair >= `floor`) at or above the point that are not in `truth`. Points below `floor`
    are left out (the sweep does not see them). Rows: {"threshold", "stated", "true", "ratio" (stated / true,
    None when true is 0)}, ascending threshold."""
    points = [p for p in curve if float(p["threshold"]) >= floor]
    at = {row["threshold"]: row["fp"] for row in sweep(scored, truth, True,
                                                       [float(p["threshold"]) for p in points])}
    rows = []
    for point in sorted(points, key=lambda p: float(p["threshold"])):
        t = float(point["threshold"])
        stated = float(point["expected_false_pairs"])
        rows.append({"threshold": round(t, 6), "stated": round(stated, 3), "true": at[t],
                     "ratio": round(stated / at[t], 3) if at[t] else None})
    return rows


def curve_summary(rows: list[dict], least_true: int = 10) -> dict:
    """The spread of stated / true false pairs over the points where the truth shows >= `least_true` false
    pairs (fewer are Poisson noise: 2 true pairs could as well have been 0 or 5)."""
    ratios = [r["ratio"] for r in rows if r["true"] >= least_true]
    return {"least_true_false_pairs": least_true, "points": len(ratios),
            "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
            "within_factor_2": all(0.5 <= x <= 2.0 for x in ratios) if ratios else None}


LINKAGE_MAX_ITEMS = 5_000  # scipy's agglomerative linkage over every pair: O(n^2) memory and time


def template_similarities(templates_glob: str, c: dict):
    """(item ids, angular similarity matrix float64 (n, n)) of the scored templates; None when there are
    fewer than 2 or more than LINKAGE_MAX_ITEMS of them (every pair is held in memory)."""
    import numpy as np

    from siamese_core.similarity import angular_similarity

    t = _read_parquet(templates_glob, ["item_id", "embedding"])
    keep = [k for k, item in enumerate(t["item_id"]) if item in c["universe"]]
    if len(keep) < 2 or len(keep) > LINKAGE_MAX_ITEMS:
        return None
    emb = np.asarray([t["embedding"][k] for k in keep], np.float64)
    return [t["item_id"][k] for k in keep], angular_similarity(np.clip(emb @ emb.T, -1.0, 1.0))


def linkage_rows(ids: list[str], sim, c: dict, threshold: float, meta: dict) -> list[dict]:
    """Clusters of the templates `ids` (similarities `sim`, from template_similarities, or their kNN-normalised
    scores) cut at `threshold` by agglomerative linkage over all pairs (scipy.cluster.hierarchy on 1 - score;
    "complete" equals the dedup stage's default, "average" and "weighted" are the candidates for a rule that
    forgives one weak link of a true group): one score row each."""
    import numpy as np
    from scipy.cluster import hierarchy

    distance = np.clip(1.0 - sim[np.triu_indices(len(ids), 1)], 0.0, None)  # scipy's condensed order
    rows = []
    for method in ("complete", "average", "weighted"):
        labels = hierarchy.fcluster(hierarchy.linkage(distance, method=method), 1.0 - threshold,
                                    criterion="distance")
        rows.append(score_row(f"ours: {method} linkage over all pairs @{threshold:.4f}", f"linkage_{method}",
                              pairs_from_clusters(ids, labels.tolist()), c, threshold=threshold,
                              threshold_rule=f"scipy {method} linkage cut at angular distance 1 - threshold",
                              **meta))
    return rows


def knn_normalised(sim, k: int, beta: float):
    """ISC2021's score normalisation (siamese_core.similarity.knn_normalised) of a whole matrix: b_i is item
    i's similarity to its k-th nearest other item. sim: angular similarities (n, n); returns the normalised
    matrix (n, n)."""
    import numpy as np

    from siamese_core import similarity

    others = sim.copy()
    np.fill_diagonal(others, -np.inf)
    kth = similarity.top_k_per_row(others, k).min(axis=1)
    return similarity.knn_normalised(sim, kth[:, None], kth[None, :], beta)


def knn_rows(ids: list[str], sim, c: dict, floor: float, meta: dict, k: int = 10,
             betas: tuple = (0.5, 1.0)) -> list[dict]:
    """Oracle rows: the best-F1 threshold over every pair whose raw similarity is >= `floor`, for the raw
    scores and for knn_normalised scores at each beta (k-th neighbour; none when there are k items or
    fewer). Both are oracles, so the rows compare what each score can separate at its best, not what a
    chosen threshold gives. ids, sim: from template_similarities."""
    import numpy as np

    if len(ids) <= k:
        return []
    iu, ju = np.triu_indices(len(ids), 1)
    near = sim[iu, ju] >= floor
    iu, ju = iu[near], ju[near]
    rows = []
    for name, matrix in [("raw", sim)] + [(f"kNN-normalised k={k} beta={b:g}", knn_normalised(sim, k, b))
                                           for b in betas]:
        scored = {canonical_pair(ids[a], ids[b]): float(matrix[a, b]) for a, b in zip(iu.tolist(), ju.tolist())}
        best = best_threshold(scored, c["truth"], True)
        if best is not None:
            rows.append(score_row(f"ours: {name} scores @{best['threshold']:.4f} (best, oracle)",
                                  "knn_best" if name != "raw" else "raw_best",
                                  threshold_pairs(scored, best["threshold"], True), c,
                                  threshold=best["threshold"], threshold_rule=f"{name} score >=", **meta))
    return rows


def run_ours(cat: str, model_dir: str, work: str, c: dict, args) -> tuple[list[dict], dict]:
    """Our stages in this process; (rows, details)."""
    sys.path.insert(0, ROOT)
    from beam_pipeline import dedup, embed, match

    images = os.path.join(cat, "images", "*")
    w = os.path.join(work, "ours")
    templates = os.path.join(w, "templates", "*.parquet")
    t0 = time.perf_counter()
    e = embed.run(["--input", images, "--model_dir", model_dir, "--output", w])
    t1 = time.perf_counter()
    margs = ["--templates", templates, "--model_dir", model_dir, "--output", w]
    if args.project_threshold is not None:
        margs += ["--threshold", str(args.project_threshold)]
    margs += shlex.split(args.match_args or "")
    m = match.run(margs)
    t2 = time.perf_counter()
    d = dedup.run(["--templates", templates, "--matches", os.path.join(w, "matches", "*.parquet"), "--output", w])
    t3 = time.perf_counter()
    own = float(m["threshold"]["value"])
    norm = (m["threshold"].get("score_norm") or {}).get("method", "none")
    # The sweep cuts the same score as the own run; kNN-normalised scores sit about beta x b lower.
    floor = min(args.sweep_floor, own) if norm == "none" else max(0.0, own - KNN_SWEEP_SPAN)
    ws = os.path.join(work, "ours_sweep")
    knn = m["threshold"].get("knn")
    same_score = ["--score_norm", norm] + (["--knn_k", str(knn["k"]), "--knn_beta", str(knn["beta"])] if knn else [])
    ms = match.run(["--templates", templates, "--model_dir", model_dir, "--output", ws, "--threshold", str(floor),
                    *same_score])
    t4 = time.perf_counter()

    clusters = _read_parquet(os.path.join(w, "clusters", "*.parquet"), ["item_id", "cluster_id"])
    failures = _read_parquet(os.path.join(w, "failures", "*.parquet"), ["item_id"])["item_id"]
    own_pairs = matched_pairs(os.path.join(w, "matches", "*.parquet"))
    all_pairs = matched_pairs(os.path.join(ws, "matches", "*.parquet"))
    seconds = round(t3 - t0, 3)
    meta = {"tool": "ours", "score": "angular similarity 1 - arccos(cos)/pi of our embeddings (higher is more "
                                     "similar)", "seconds": seconds, "skipped": len(failures),
            "skipped_ids": sorted(failures), "model_dir": os.path.abspath(model_dir),
            "model_id": m.get("model_id"), "threshold_source": m["threshold"].get("source")}
    rows = [
        score_row(f"ours: clusters @{own:.4f} (own threshold)", "own",
                  pairs_from_clusters(clusters["item_id"], clusters["cluster_id"]), c, threshold=own,
                  threshold_rule="angular similarity >=, then dedup clusters (default linkage)", **meta),
        score_row(f"ours: matched pairs @{own:.4f} (own threshold)", "own_pairs", own_pairs, c, threshold=own,
                  threshold_rule="angular similarity >=", **meta),
    ]
    kept = {p: s for p, s in all_pairs.items() if p[0] in c["universe"] and p[1] in c["universe"]}
    best = best_threshold(kept, c["truth"], True)
    if best is not None:
        rows.append(score_row(f"ours: matched pairs @{best['threshold']:.4f} (best, oracle)", "best",
                              threshold_pairs(all_pairs, best["threshold"], True), c, threshold=best["threshold"],
                              threshold_rule="angular similarity >=", sweep_floor=floor,
                              best_at_floor=bool(kept) and best["threshold"] <= min(kept.values()),
                              sweep=_grid_curve(kept, c["truth"], round(floor, 2)), **meta))
    details = {"embed_seconds": round(t1 - t0, 3), "match_seconds": round(t2 - t1, 3),
               "dedup_seconds": round(t3 - t2, 3), "sweep_match_seconds": round(t4 - t3, 3),
               "embedded": e.get("embedded"), "failed": e.get("failed"), "matches": m.get("pairs"),
               "sweep_matches": ms.get("pairs"), "threshold": m["threshold"], "clusters": d.get("clusters_count"),
               "items_to_drop": d.get("items_to_drop")}
    cal = m["threshold"].get("self_calibration")
    if cal:  # the false pairs self-calibration stated against those the ground truth shows
        scored = {p for p in own_pairs if p[0] in c["universe"] and p[1] in c["universe"]}
        true_false = len(scored - c["truth"])
        stated = float(cal["expected_false_pairs"])
        details["self_calibration_check"] = {
            "stated_false_pairs": stated, "stated_ci95": cal["expected_false_pairs_ci95"],
            "true_false_pairs": true_false, "matched_pairs": len(scored),
            "ratio_stated_to_true": round(stated / true_false, 3) if true_false else None,
            "within_factor_2": (true_false / 2 <= stated <= 2 * true_false) if true_false else stated <= 2.0,
            "stated_copy_recall": (cal.get("expected_copy_recall") or {}).get("estimate"),
            "true_recall": round(len(scored & c["truth"]) / len(c["truth"]), 4) if c["truth"] else None}
        along = false_pairs_along_curve(cal.get("curve") or [], kept, c["truth"], floor)
        details["self_calibration_curve"] = {"points": along, "summary": curve_summary(along)}
    found = template_similarities(templates, c)  # one n x n matrix serves both comparisons
    if found is not None:
        ids, sim = found
        # The linkage rules cut the score the own threshold is in; the kNN rows compare raw and normalised.
        rows += linkage_rows(ids, sim if knn is None else knn_normalised(sim, knn["k"], knn["beta"]), c, own, meta)
        rows += knn_rows(ids, sim, c, min(args.sweep_floor, own) if knn is None else args.sweep_floor, meta)
    return rows, details


# -------------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalogue", required=True, help="CAT: images/, ground_truth.csv, manifest.csv")
    p.add_argument("--work", default="/tmp/bench_neardup", help="work directory (default /tmp/bench_neardup)")
    p.add_argument("--json", default=None, help="write every figure here as one JSON document "
                                                "(default WORK/bench_neardup.json)")
    g = p.add_argument_group("ours")
    g.add_argument("--project_model", default=None,
                   help="encoder artefact directory (model.keras + model_card.json); with --project_train, "
                        "where the trained one is written (default WORK/model)")
    g.add_argument("--project_train", action="store_true",
                   help="train an encoder on the catalogue itself: python -m trainer.train --data unlabelled "
                        "--data_path CAT/images --output M + --train_args")
    g.add_argument("--train_args", default="--preset catalogue",
                   help="trainer flags for --project_train (default '--preset catalogue')")
    g.add_argument("--project_threshold", type=float, default=None,
                   help="match threshold (angular similarity); default: our match stage's own (model card)")
    g.add_argument("--match_args", default="", help="extra flags for our match stage's own-threshold run")
    g.add_argument("--sweep_floor", type=float, default=0.6,
                   help="lowest angular similarity of the best-threshold sweep's match run (default 0.6)")
    g = p.add_argument_group("peers")
    g.add_argument("--peers", default=",".join(PEER_METHODS),
                   help=f"comma-separated peers among {','.join(PEER_METHODS)} (default all; 'none': none)")
    g.add_argument("--peers_python", default=sys.executable,
                   help="the Python that runs bench/peers.py (default this one)")
    g.add_argument("--hash_cap", type=int, default=20, help="largest Hamming distance swept (default 20)")
    g.add_argument("--fastdup_k", type=int, default=20, help="fastdup nearest neighbours for the sweep (default 20)")
    g.add_argument("--fastdup_floor", type=float, default=0.5,
                   help="lowest fastdup similarity of the sweep (default 0.5)")
    g.add_argument("--peer_timeout", type=float, default=7200, help="seconds per peer process (default 7200)")
    g.add_argument("--threads", type=int, default=None, help="peer worker processes/threads (default: cores)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cat = args.catalogue
    image_dir = os.path.join(cat, "images")
    os.makedirs(args.work, exist_ok=True)
    c = read_catalogue(cat)
    doc = {"catalogue": catalogue_summary(cat, c),
           "definitions": {"pairs": "unordered pairs of distinct scored items (non-broken manifest items); "
                                    "predicted pairs with a broken or unknown item are dropped",
                           "per_family": FAMILY_DEFINITION, "best": BEST_DEFINITION, "errors": "1 - F1",
                           "seconds": "wall seconds of the method's work on this machine (shared: indicative)"},
           "environment": {"python": platform.python_version(), "machine": platform.machine(),
                           "cores": os.cpu_count()},
           "missing": [], "errors": {}, "rows": []}
    rows: list[dict] = []

    # ours
    model_dir = args.project_model
    if args.project_train or model_dir:
        try:
            if args.project_train:
                model_dir = model_dir or os.path.join(args.work, "model")
                secs = train_model(cat, model_dir, args.train_args, os.path.join(args.work, "train.log"))
                doc["ours_training"] = {"seconds": round(secs, 3), "train_args": args.train_args,
                                        "model_dir": os.path.abspath(model_dir)}
            ours_rows, details = run_ours(cat, model_dir, args.work, c, args)
            rows += ours_rows
            doc["ours"] = details
        except Exception as err:  # report and carry on with the peers
            logging.exception("our arm failed")
            doc["errors"]["ours"] = f"{type(err).__name__}: {err}"
    else:
        print("note: no --project_model / --project_train: our arm is skipped", file=sys.stderr)

    # peers
    wanted = [] if args.peers.strip() == "none" else [m.strip() for m in args.peers.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(PEER_METHODS))
    if unknown:
        raise SystemExit(f"--peers: unknown {unknown}; choose among {PEER_METHODS}")
    results = {}
    peer_work = os.path.join(args.work, "peers")
    runs = [m for m in wanted if m != "fastdup"] + (["fastdup_default", "fastdup"] if "fastdup" in wanted else [])
    for method in runs:
        logging.info("peer %s ...", method)
        r = run_peer(method, image_dir, peer_work, args.peers_python, args)
        if "missing" in r:
            msg = f"peer {method}: package {r['missing']} is missing; install the peers with: {INSTALL}"
            print(msg, file=sys.stderr)
            doc["missing"].append({"method": method, "package": r["missing"], "install": INSTALL})
            continue
        if "error" in r:
            print(f"peer {method} failed: {r['error']}", file=sys.stderr)
            doc["errors"][method] = r["error"]
            continue
        logging.info("peer %s: %d pairs, %d skipped, %.1f s", method, len(r["pairs"]), len(r["skipped"]),
                     r["seconds"])
        results[method] = r
    rows += peer_rows(results, c, args.hash_cap)
    doc["rows"] = rows
    doc["ratios"] = ratios(rows)

    fams = c["families"]
    s = doc["catalogue"]
    print(f"\ncatalogue {s['path']}: {s['items']} items ({s['broken']} broken), {s['copies']} copies of "
          f"{s['originals']} originals, {s['planted_pairs']} planted pairs\n")
    print(markdown_table(rows, fams))
    print("\nper family recall:\n")
    print(family_recall_table(rows, fams))
    print(f"\nper family: {FAMILY_DEFINITION}.\nbest: {BEST_DEFINITION}.")
    for label in ("default", "best"):
        r = doc["ratios"][label]
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3f}"
        verdict = "" if r["meets_target"] is None else (" (meets the target <= 0.5)" if r["meets_target"]
                                                        else " (misses the target <= 0.5)")
        print(f"errors ratio, {label}: ours {r['ours']} (F1 {_fmt(r['ours_f1'])}) / best peer {r['best_peer']} "
              f"(F1 {_fmt(r['best_peer_f1'])}) = {ratio}{verdict}")
    check = (doc.get("ours") or {}).get("self_calibration_check")
    if check:
        lo, hi = check["stated_ci95"]
        print(f"self-calibration: stated {check['stated_false_pairs']:.2f} false pairs (95% {lo:.2f}-{hi:.2f}); the "
              f"ground truth shows {check['true_false_pairs']} of {check['matched_pairs']} matched pairs "
              f"({'within' if check['within_factor_2'] else 'NOT within'} a factor of 2); stated copy recall "
              f"{_fmt(check['stated_copy_recall'])}, true pair recall {_fmt(check['true_recall'])}")
    along = (doc.get("ours") or {}).get("self_calibration_curve")
    if along and along["summary"]["points"]:
        a = along["summary"]
        print(f"self-calibration along its curve: stated / true false pairs {a['ratio_min']:.2f}-{a['ratio_max']:.2f} "
              f"over the {a['points']} thresholds where the truth shows >= {a['least_true_false_pairs']} false pairs")
    for r in rows:
        if r.get("best_at_cap") or r.get("best_at_floor"):
            print(f"note: {r['method']}: the best threshold is at the edge of the sweep; widen it "
                  f"(--hash_cap / --fastdup_floor / --sweep_floor)")
    for m in doc["missing"]:
        print(f"missing peer {m['method']}: {m['package']} ({m['install']})")
    for method, err in doc["errors"].items():
        print(f"failed: {method}: {err.splitlines()[0]}")
    out = args.json or os.path.join(args.work, "bench_neardup.json")
    with open(out, "w") as fh:
        json.dump(doc, fh, indent=1, default=str)
    print(f"\nwrote {out}")
    return doc


if __name__ == "__main__":
    main()
