"""Numbers of the run report (pure NumPy): similarity histogram, and scores against planted duplicates.

Ground truth is a list of planted duplicate pairs (left_id, right_id). It is closed transitively first:
items linked by planted pairs form a ground-truth group (copies of one original photo), and every pair
inside a group is a true duplicate pair, so two copies of one original count as duplicates of each other
even if only (original, copy) pairs were listed. A CSV that already lists every pair (the demo's) is
unchanged by the closure.

Scores at the run threshold are counted as pairs of the dedup result:
  predicted pairs = pairs of items in the same cluster (sum over clusters of size*(size-1)/2),
  found           = true pairs whose two items are in the same cluster,
  precision = found / predicted pairs, recall = found / true pairs (pairs with an item that never became
  a template, e.g. failed to decode, count as missed).
The threshold sweep re-clusters the matched pairs at each higher threshold (the matches only hold pairs
at or above the run threshold, so lower thresholds cannot be scored) and also gives pair-level error
rates with the counts behind them: FNMR = true pairs not matched / true pairs, FMR = matched non-duplicate
pairs / all non-duplicate pairs among the templates, with a one-sided 95% Clopper-Pearson upper bound.
"""
from __future__ import annotations

import csv
import io as _io
from typing import Sequence

import numpy as np

from beam_pipeline.clustering import connected_components


def similarity_histogram(similarity: np.ndarray, low: float, bins: int = 20) -> dict:
    """Histogram of angular similarities over [low, 1] in `bins` equal bins (last bin closed).

    Returns {"bin_edges": list (bins+1), "counts": list[int] (bins), "of": "matched pairs..."}; values
    below `low` are not expected (the matches hold pairs at or above the threshold) and are refused.
    """
    s = np.asarray(similarity, np.float64)
    low = float(low)
    if low >= 1.0:
        low = 1.0 - 1e-6
    edges = np.linspace(low, 1.0, int(bins) + 1)
    # float32 storage can put a pair a hair under its threshold after arccos; clamp within 1e-6.
    if (s < low - 1e-6).any():
        raise ValueError(f"matched pair with angular similarity {s.min():.6f} below the histogram low {low:.6f}")
    counts, _ = np.histogram(np.clip(s, low, 1.0), bins=edges)
    return {
        "bin_edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "of": "matched pairs (angular similarity)",
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


def fmr_upper_95(false_matches: int, impostor_pairs: int) -> float | None:
    """One-sided 95% Clopper-Pearson upper bound of the FMR; None without impostor pairs."""
    if impostor_pairs <= 0:
        return None
    if false_matches >= impostor_pairs:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(0.95, false_matches + 1, impostor_pairs - false_matches))


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


def cluster_scores(cluster_labels: np.ndarray, truth: GroundTruth) -> dict:
    """Pair counts, precision and recall of a clustering (labels aligned with truth.item_ids)."""
    cluster_labels = np.asarray(cluster_labels)
    _, sizes = np.unique(cluster_labels, return_counts=True)
    predicted = _pairs(sizes)
    found = _joint_pairs(cluster_labels, truth.labels)
    return {
        "predicted_pairs": predicted,
        "found_pairs": found,
        "precision": found / predicted if predicted else None,
        "recall": found / truth.closed_pairs if truth.closed_pairs else None,
    }


def sweep_thresholds(low: float, steps: int = 10) -> list[float]:
    """The run threshold and `steps - 1` higher ones, evenly spaced below 1."""
    low = float(low)
    return [round(low + (1.0 - low) * k / steps, 6) for k in range(steps)]


def evaluate(
    item_ids: Sequence[str],
    cluster_ids: Sequence[str],
    match_left: Sequence[str],
    match_right: Sequence[str],
    match_similarity: np.ndarray,
    planted: Sequence[tuple[str, str]],
    threshold: float,
    steps: int = 10,
) -> dict:
    """Scores of a run against planted pairs (see the module docstring for the definitions).

    `item_ids` / `cluster_ids` are the clusters table's rows (every template item); matches are the
    matched pairs with their angular similarity; `threshold` the run's angular threshold.
    Returns {"precision", "recall", counts..., "sweep": [per threshold: clusters and pair-level rates]}.
    """
    truth = GroundTruth(item_ids, planted)
    index = {item: k for k, item in enumerate(truth.item_ids)}
    _, cluster_labels = np.unique(np.asarray(list(cluster_ids), dtype=str), return_inverse=True)
    at_run = cluster_scores(cluster_labels, truth)
    try:
        i = np.fromiter((index[x] for x in match_left), np.int64, len(match_left))
        j = np.fromiter((index[x] for x in match_right), np.int64, len(match_right))
    except KeyError as err:
        raise ValueError(f"matched item {err.args[0]!r} has no clusters row: rerun dedup on these matches") from None
    sim = np.asarray(match_similarity, np.float32)
    genuine = truth.same_group(i, j)
    n = len(truth.item_ids)
    sweep = []
    for t in sweep_thresholds(threshold, steps):
        keep = sim >= np.float32(t) if t > threshold else np.ones(len(sim), np.bool_)
        labels, _ = connected_components(n, i[keep], j[keep])
        true_matches = int(genuine[keep].sum())
        false_matches = int((~genuine[keep]).sum())
        scores = cluster_scores(labels, truth)
        sweep.append(
            {
                "angular_similarity": t,
                "matched_pairs": int(keep.sum()),
                "true_matches": true_matches,
                "false_matches": false_matches,
                "genuine_pairs": truth.evaluable_pairs,
                "impostor_pairs": truth.impostor_pairs,
                "fnmr": 1.0 - true_matches / truth.evaluable_pairs if truth.evaluable_pairs else None,
                "fmr": false_matches / truth.impostor_pairs if truth.impostor_pairs else None,
                "fmr_upper_95": fmr_upper_95(false_matches, truth.impostor_pairs),
                "cluster_precision": scores["precision"],
                "cluster_recall": scores["recall"],
                "predicted_pairs": scores["predicted_pairs"],
            }
        )
    return {
        "threshold": float(threshold),
        "precision": at_run["precision"],
        "recall": at_run["recall"],
        "found_pairs": at_run["found_pairs"],
        "predicted_pairs": at_run["predicted_pairs"],
        "planted_pairs_given": truth.planted_given,
        "planted_pairs": truth.closed_pairs,
        "planted_pairs_with_missing_items": truth.closed_pairs - truth.evaluable_pairs,
        "items_missing_from_templates": truth.missing_items,
        "matched_pairs_genuine": int(genuine.sum()),
        "matched_pairs_impostor": int((~genuine).sum()),
        "definition": (
            "pairs: planted pairs closed into groups (copies of one original are duplicates of each "
            "other); precision = planted pairs inside one cluster / pairs inside clusters; recall = "
            "planted pairs inside one cluster / planted pairs (items that never became templates count "
            "as missed). sweep: re-clustered matches at each threshold; fnmr/fmr are pair-level over "
            "template items, with the genuine/impostor pair counts behind them"
        ),
        "sweep": sweep,
    }
