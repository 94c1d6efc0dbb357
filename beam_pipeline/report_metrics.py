"""Numbers of the run report (pure NumPy): similarity histogram, and scores against planted duplicates.

Ground truth is a list of planted duplicate pairs (left_id, right_id). It is closed transitively first:
items linked by planted pairs form a ground-truth group (copies of one original photo), and every pair
inside a group is a true duplicate pair, so two copies of one original count as duplicates of each other
even if only (original, copy) pairs were listed. A CSV that already lists every pair (the demo's) is
unchanged by the closure.

Scores at the run threshold are counted at two levels, both against the same true pairs (the closed
planted pairs; pairs with an item that never became a template, e.g. failed to decode, count as missed):
  clusters ("clusters", and the top-level precision/recall/f1): pairs implied by the dedup result,
    predicted pairs = pairs of items in the same cluster (sum over clusters of size*(size-1)/2),
    found           = true pairs whose two items are in the same cluster;
  pairs ("pairs"): the matches table itself, before any clustering,
    predicted pairs = distinct matched pairs, found = matched pairs that are true pairs;
  precision = found / predicted, recall = found / true pairs, F1 = 2 found / (predicted + true pairs)
  (their harmonic mean). Single-linkage clusters imply every matched pair and more (all pairs of a
  connected component); complete-linkage clusters imply a subset of the matched pairs (every pair inside
  a cluster is matched), so the gap between the two levels is what the clustering added or gave up.
Per edit family (`families`: item_id -> family of that copy, e.g. the `edit` column of a catalogue's
manifest.csv; originals have none), both levels again, restricted to pairs touching the family: true
pairs = true pairs with at least one item of the family; predicted = predicted pairs with at least one
item of the family; found = true pairs among those predicted.
The threshold sweep re-clusters the matched pairs at each higher threshold (the matches only hold pairs
at or above the run threshold, so lower thresholds cannot be scored; `sweep_linkage` says how: connected
components unless the run's linkage is passed), with pair-level precision/recall/F1, and gives error
rates with the counts behind them: FNMR = true pairs not matched / true pairs, FMR = matched non-duplicate
pairs / all non-duplicate pairs among the templates, with a one-sided 95% Clopper-Pearson upper bound.
"""
from __future__ import annotations

import csv
import io as _io
from typing import Sequence

import numpy as np

from beam_pipeline.clustering import LINKAGE_RULES, LINKAGES, connected_components
from siamese_core.error_rates import rate_upper_bound


def similarity_histogram(similarity: np.ndarray, low: float, bins: int = 20,
                         score: str = "angular similarity", high: float = 1.0) -> dict:
    """Histogram of the matches' scores (`score` names them) over [low, high] in `bins` equal bins (last bin
    closed; high 1 for angular similarity, the highest score for kNN-normalised ones).

    Returns {"bin_edges": list (bins+1), "counts": list[int] (bins), "of": "matched pairs..."}; values
    below `low` are not expected (the matches hold pairs at or above the threshold) and are refused.
    """
    s = np.asarray(similarity, np.float64)
    low, high = float(low), float(high)
    if low >= high:
        low = high - 1e-6
    edges = np.linspace(low, high, int(bins) + 1)
    # float32 storage can put a pair a hair under its threshold after arccos; clamp within 1e-6.
    if (s < low - 1e-6).any():
        raise ValueError(f"matched pair with angular similarity {s.min():.6f} below the histogram low {low:.6f}")
    counts, _ = np.histogram(np.clip(s, low, high), bins=edges)
    return {
        "bin_edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "of": f"matched pairs ({score})",
    }


def read_ground_truth(text: str) -> list[tuple[str, str]]:
    """Planted pairs from CSV text with a header naming `left_id` and `right_id` columns.

    Pairs are oriented (smaller id first) and deduplicated, sorted. Raises ValueError for a missing
    column or a pair of an item with itself.
    """
    reader = csv.DictReader(_io.StringIO(text))
    if not reader.fieldnames or not {"left_id", "right_id"} <= set(reader.fieldnames):
        raise ValueError(f"ground truth CSV needs columns left_id,right_id; it has {reader.fieldnames}")
    pairs = set()
    for line, row in enumerate(reader, start=2):
        a, b = (row["left_id"] or "").strip(), (row["right_id"] or "").strip()
        if not a or not b:
            raise ValueError(f"ground truth line {line}: empty item id")
        if a == b:
            raise ValueError(f"ground truth line {line}: pair of {a!r} with itself")
        pairs.add((a, b) if a < b else (b, a))
    return sorted(pairs)


def _pairs(k: np.ndarray) -> int:
    k = np.asarray(k, np.int64)
    return int((k * (k - 1) // 2).sum())


def _joint_pairs(a: np.ndarray, b: np.ndarray) -> int:
    """Pairs of items sharing both label a and label b."""
    if len(a) == 0:
        return 0
    _, counts = np.unique(np.stack([a, b], axis=1), axis=0, return_counts=True)
    return _pairs(counts)


class GroundTruth:
    """Planted pairs closed into groups, indexed over the template items."""

    def __init__(self, item_ids: Sequence[str], planted: Sequence[tuple[str, str]]):
        self.item_ids = list(item_ids)
        index = {item: k for k, item in enumerate(self.item_ids)}
        extra = sorted({x for pair in planted for x in pair} - set(index))
        all_ids = self.item_ids + extra  # items of the truth that are not templates come last
        full_index = {**index, **{x: len(self.item_ids) + k for k, x in enumerate(extra)}}
        i = np.fromiter((full_index[a] for a, _ in planted), np.int64, len(planted))
        j = np.fromiter((full_index[b] for _, b in planted), np.int64, len(planted))
        labels, _ = connected_components(len(all_ids), i, j)
        self.all_ids = all_ids  # templates, then truth items that are not templates
        self.all_labels = labels  # group label of every item of all_ids
        n = len(self.item_ids)
        self.planted_given = len(planted)
        self.missing_items = len(extra)
        _, all_counts = np.unique(labels, return_counts=True)
        self.closed_pairs = _pairs(all_counts)  # every pair within a group, missing items included
        self.labels = labels[:n]  # group label of each template item (a singleton's own index)
        _, present_counts = np.unique(self.labels, return_counts=True)
        self.evaluable_pairs = _pairs(present_counts)  # both items are templates
        total = n * (n - 1) // 2
        self.impostor_pairs = total - self.evaluable_pairs

    def same_group(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Whether template items i[k], j[k] are planted duplicates (bool (k,))."""
        return self.labels[np.asarray(i, np.int64)] == self.labels[np.asarray(j, np.int64)]


def f1_score(found: int, predicted: int, planted: int) -> float | None:
    """F1 = 2 found / (predicted + planted): the harmonic mean of precision and recall (0 when nothing true
    was found); None when there is nothing predicted and nothing planted."""
    return 2 * found / (predicted + planted) if predicted + planted else None


def _scores(found: int, predicted: int, planted: int) -> dict:
    return {
        "predicted_pairs": int(predicted),
        "found_pairs": int(found),
        "planted_pairs": int(planted),
        "precision": found / predicted if predicted else None,
        "recall": found / planted if planted else None,
        "f1": f1_score(found, predicted, planted),
    }


def cluster_scores(cluster_labels: np.ndarray, truth: GroundTruth) -> dict:
    """Pairs implied by a clustering (labels aligned with truth.item_ids) against the true pairs:
    {"predicted_pairs", "found_pairs", "planted_pairs", "precision", "recall", "f1"}."""
    cluster_labels = np.asarray(cluster_labels)
    _, sizes = np.unique(cluster_labels, return_counts=True)
    return _scores(_joint_pairs(cluster_labels, truth.labels), _pairs(sizes), truth.closed_pairs)


def unique_pairs(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct unordered pairs (smaller index first) of the pairs (i[k], j[k]), sorted."""
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    if not len(i):
        return i, j
    pairs = np.unique(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def pair_scores(i: np.ndarray, j: np.ndarray, truth: GroundTruth) -> dict:
    """Matched pairs (template indices i[k], j[k]; direction and repeats do not count) against the true
    pairs: {"predicted_pairs", "found_pairs", "planted_pairs", "precision", "recall", "f1"}."""
    ui, uj = unique_pairs(i, j)
    return _scores(int(truth.same_group(ui, uj).sum()), len(ui), truth.closed_pairs)


def _pairs_touching(labels: np.ndarray, mask: np.ndarray) -> int:
    """Pairs of items sharing a label with at least one item in `mask`: per label C(k,2) - C(k - k_mask, 2)."""
    if not len(labels):
        return 0
    _, inverse = np.unique(np.asarray(labels), return_inverse=True)
    inverse = inverse.ravel()
    k = np.bincount(inverse)
    k_out = np.bincount(inverse, weights=~np.asarray(mask, np.bool_), minlength=len(k)).astype(np.int64)
    return _pairs(k) - _pairs(k_out)


def family_codes(item_ids: Sequence[str], families: dict) -> tuple[list[str], np.ndarray]:
    """(family names, sorted; per item the index of its family in them, -1 for none) for `item_ids`.
    Items missing from `families`, or mapped to None or "", have no family (originals)."""
    def name(x):
        value = families.get(x)
        return None if value is None or (isinstance(value, float) and np.isnan(value)) or str(value) == "" \
            else str(value)

    names = sorted({n for n in map(name, families) if n is not None})
    code = {n: k for k, n in enumerate(names)}
    return names, np.fromiter((code.get(name(x), -1) for x in item_ids), np.int64, len(item_ids))


def family_scores(cluster_labels: np.ndarray, i: np.ndarray, j: np.ndarray, truth: GroundTruth,
                  families: dict) -> dict:
    """Per edit family, {"items": items of the family among templates and truth, "pairs": pair-level
    scores, "clusters": cluster-level scores} (see the module docstring): true pairs are the true pairs
    with at least one item of the family, predicted pairs those with at least one item of the family.
    `cluster_labels` aligned with truth.item_ids; (i, j) the matched pairs as template indices."""
    names, codes_all = family_codes(truth.all_ids, families)
    n = len(truth.item_ids)
    codes = codes_all[:n]
    cluster_labels = np.asarray(cluster_labels, np.int64)
    joint = cluster_labels * np.int64(max(len(truth.all_ids), 1)) + truth.labels  # cluster and truth group
    ui, uj = unique_pairs(i, j)
    genuine = truth.same_group(ui, uj)
    out = {}
    for k, family in enumerate(names):
        planted = _pairs_touching(truth.all_labels, codes_all == k)
        touching = (codes[ui] == k) | (codes[uj] == k)
        out[family] = {
            "items": int((codes_all == k).sum()),
            "pairs": _scores(int((touching & genuine).sum()), int(touching.sum()), planted),
            "clusters": _scores(_pairs_touching(joint, codes == k), _pairs_touching(cluster_labels, codes == k),
                                planted),
        }
    return out


def read_families(text: str, family_column: str = "edit") -> dict:
    """{item_id: edit family} from CSV text with `item_id` and `family_column` (a catalogue's manifest.csv:
    the family of each copy, empty for originals, which are left out)."""
    reader = csv.DictReader(_io.StringIO(text))
    if not reader.fieldnames or not {"item_id", family_column} <= set(reader.fieldnames):
        raise ValueError(f"manifest CSV needs columns item_id,{family_column}; it has {reader.fieldnames}")
    out = {}
    for row in reader:
        item, family = (row["item_id"] or "").strip(), (row[family_column] or "").strip()
        if item and family:
            out[item] = family
    return out


def sweep_thresholds(low: float, steps: int = 10, high: float = 1.0) -> list[float]:
    """The run threshold and `steps - 1` higher ones, evenly spaced below `high` (1 for angular similarity;
    the highest matched score for kNN-normalised scores, which stay well below 1)."""
    low = float(low)
    return [round(low + (float(high) - low) * k / steps, 6) for k in range(steps)]


def evaluate(
    item_ids: Sequence[str],
    cluster_ids: Sequence[str],
    match_left: Sequence[str],
    match_right: Sequence[str],
    match_similarity: np.ndarray,
    planted: Sequence[tuple[str, str]],
    threshold: float,
    steps: int = 10,
    families: dict | None = None,
    sweep_linkage: str = "single",
    sweep_high: float = 1.0,
) -> dict:
    """Scores of a run against planted pairs (see the module docstring for the definitions).

    `item_ids` / `cluster_ids` are the clusters table's rows (every template item); matches are the
    matched pairs with their angular similarity; `threshold` the run's angular threshold; `families`
    (optional) {item_id: edit family} of the copies (`read_families`); `sweep_linkage` how the sweep
    re-clusters the matches at each threshold (clustering.LINKAGE_RULES): "single" (connected components,
    the default) or "complete" (complete linkage; pass the run's --linkage to match its clusters), up to
    `sweep_high`. Similarities and thresholds are in the run's score (angular, or kNN-normalised).
    Returns {"precision", "recall", "f1" (cluster level, as "clusters"), counts...,
    "clusters": {predicted_pairs, found_pairs, planted_pairs, precision, recall, f1},
    "pairs": the same for the matched pairs, "families": {family: {"items", "pairs", "clusters"}} or
    None, "sweep": [per threshold: clusters and pair-level rates]}.
    """
    truth = GroundTruth(item_ids, planted)
    index = {item: k for k, item in enumerate(truth.item_ids)}
    _, cluster_labels = np.unique(np.asarray(list(cluster_ids), dtype=str), return_inverse=True)
    cluster_labels = cluster_labels.ravel()
    at_run = cluster_scores(cluster_labels, truth)
    try:
        i = np.fromiter((index[x] for x in match_left), np.int64, len(match_left))
        j = np.fromiter((index[x] for x in match_right), np.int64, len(match_right))
    except KeyError as err:
        raise ValueError(f"matched item {err.args[0]!r} has no clusters row: rerun dedup on these matches") from None
    if sweep_linkage not in LINKAGES:
        raise ValueError(f"sweep_linkage must be one of {LINKAGES}, got {sweep_linkage!r}")
    matched = pair_scores(i, j, truth)
    sim = np.asarray(match_similarity, np.float32)
    genuine = truth.same_group(i, j)
    n = len(truth.item_ids)
    sweep = []
    for t in sweep_thresholds(threshold, steps, sweep_high):
        keep = sim >= np.float32(t) if t > threshold else np.ones(len(sim), np.bool_)
        labels = LINKAGE_RULES[sweep_linkage].labels(n, i[keep], j[keep], sim[keep], t)
        true_matches = int(genuine[keep].sum())
        false_matches = int((~genuine[keep]).sum())
        scores = cluster_scores(labels, truth)
        kept_pairs = pair_scores(i[keep], j[keep], truth)
        sweep.append(
            {
                "threshold": t,
                "linkage": sweep_linkage,
                "matched_pairs": int(keep.sum()),
                "true_matches": true_matches,
                "false_matches": false_matches,
                "genuine_pairs": truth.evaluable_pairs,
                "impostor_pairs": truth.impostor_pairs,
                "fnmr": 1.0 - true_matches / truth.evaluable_pairs if truth.evaluable_pairs else None,
                "fmr": false_matches / truth.impostor_pairs if truth.impostor_pairs else None,
                "fmr_upper_95": rate_upper_bound(false_matches, truth.impostor_pairs),
                "cluster_precision": scores["precision"],
                "cluster_recall": scores["recall"],
                "cluster_f1": scores["f1"],
                "predicted_pairs": scores["predicted_pairs"],
                "pair_precision": kept_pairs["precision"],
                "pair_recall": kept_pairs["recall"],
                "pair_f1": kept_pairs["f1"],
            }
        )
    return {
        "threshold": float(threshold),
        "precision": at_run["precision"],
        "recall": at_run["recall"],
        "f1": at_run["f1"],
        "found_pairs": at_run["found_pairs"],
        "predicted_pairs": at_run["predicted_pairs"],
        "planted_pairs_given": truth.planted_given,
        "planted_pairs": truth.closed_pairs,
        "planted_pairs_with_missing_items": truth.closed_pairs - truth.evaluable_pairs,
        "items_missing_from_templates": truth.missing_items,
        "matched_pairs_genuine": int(genuine.sum()),
        "matched_pairs_impostor": int((~genuine).sum()),
        "clusters": {**at_run, "of": "pairs implied by the clusters (two items in one cluster)"},
        "pairs": {**matched, "of": "matched pairs (the matches table, distinct unordered pairs)"},
        "families": None if families is None else family_scores(cluster_labels, i, j, truth, families),
        "definition": (
            "true pairs: planted pairs closed into groups (copies of one original are duplicates of each "
            "other); items that never became templates count as missed. clusters (and the top-level "
            "precision/recall/f1): predicted = pairs inside one cluster; pairs: predicted = distinct "
            "matched pairs; precision = found / predicted, recall = found / true pairs, f1 = 2 found / "
            "(predicted + true pairs). families: per edit family, true pairs with at least one item of "
            "the family, predicted pairs with at least one item of the family. sweep: re-clustered "
            "matches at each threshold (its linkage says how); fnmr/fmr are pair-level over template items "
            "(fnmr over true pairs whose items are both templates), with the genuine/impostor pair "
            "counts behind them"
        ),
        "sweep": sweep,
    }


SWEEP_POINTS = 25


def threshold_sweep(threshold: float, n_items: int, i: np.ndarray, j: np.ndarray, score: np.ndarray, *,
                    linkage: str, predicted: "callable", expected_false: "callable | None",
                    low: float, high: float, points: int = SWEEP_POINTS) -> list[dict]:
    """What each threshold would give, without labels, so the knee is visible (report "Choosing the
    threshold").

    `points` thresholds from `low` to `high` plus the run's own. At each: `pairs`, the catalogue's pairs at
    or above it (`predicted(thresholds)`: from the all-pairs distribution, estimated where it was sampled);
    `expected_false_pairs` (`expected_false(thresholds)`: the self-calibration's estimate, or the truth's
    impostors when labels exist; None where unknown); and at or above the run's threshold, where the
    matches hold every pair, the dedup result re-clustered from the matched pairs (i, j, score) with the
    run's `linkage`: `clusters` (of two or more items) and `items_to_drop`. Below the run's threshold those
    are None: the matches do not hold the pairs they would need.
    """
    grid = np.unique(np.append(np.linspace(low, high, points), threshold))
    grid = grid[(grid >= low) & (grid <= high)] if high > low else np.array([threshold])
    pairs = predicted(grid)
    false = None if expected_false is None else expected_false(grid)
    i, j, score = np.asarray(i, np.int64), np.asarray(j, np.int64), np.asarray(score, np.float32)
    out = []
    for k, t in enumerate(grid):
        row = {"threshold": round(float(t), 6), "is_run_threshold": bool(np.isclose(t, threshold)),
               "pairs": float(pairs[k]), "expected_false_pairs": None if false is None or false[k] is None else float(false[k]),
               "clusters": None, "items_to_drop": None}
        if t >= threshold - 1e-9:
            keep = score >= np.float32(max(t, threshold))
            labels = LINKAGE_RULES[linkage].labels(n_items, i[keep], j[keep], score[keep], float(t))
            sizes = np.bincount(np.unique(labels, return_inverse=True)[1].ravel())
            row.update(clusters=int((sizes > 1).sum()), items_to_drop=int((sizes - 1).sum()),
                       matched_pairs=int(keep.sum()))
        out.append(row)
    return out
