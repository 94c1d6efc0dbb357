"""The scores of all pairs of a catalogue, and the curves a person chooses a threshold by (pure NumPy).

A catalogue of N items has N(N-1)/2 pairs; the match stage keeps only those at or above its threshold, so
the report cannot see from the matches what a lower threshold would bring, nor how the impostors are
spread. `pair_score_distribution` scores the pairs again from the templates, block by block (memory
O(block x N)): every pair when N <= EXACT_ITEMS, otherwise every pair of a seeded random subset of
EXACT_ITEMS items, with the counts scaled by N(N-1) / (n(n-1)) to the whole catalogue (stated: `exhaustive`,
`scale`). It keeps
- a histogram of the scores on a fixed grid of BINS bins (impostors; and genuine pairs apart when the
  truth's group labels are given: every genuine pair is scored, subset or not);
- the BORDERLINE highest pairs below the run's threshold (the pairs a person should look at because the
  threshold just left them out).
Scores are the run's: angular similarity, or kNN-normalised (pass each item's b and beta).

`curves` turns a distribution with genuine pairs into ROC (and its AUC), DET, precision/recall, the equal
error rate and the threshold at each target FMR with the impostor pairs behind it and an exact
(Clopper-Pearson) 95% interval of the FMR reached. Threshold resolution: one bin (1/BINS of the range).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from siamese_core.similarity import angular_similarity, kth_neighbour_similarity, knn_normalised, upper_pair_blocks
from siamese_core.error_rates import RULE_OF_THREE, rate_interval_95

EXACT_ITEMS = 20_000          # above: a seeded subset of this many items (2e8 pairs) is scored
BINS = 4000                   # histogram bins over the score range
BORDERLINE = 48               # pairs kept just below the threshold
TARGET_FMRS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
# The range of each score: angular similarity lies in [0, 1]; a kNN-normalised score (angular less beta x
# the mean of two b's in [0, 1]) in [-beta, 1], and beta <= 1.
SCORE_RANGES = {"angular_similarity": (0.0, 1.0), "knn_normalised": (-1.0, 1.0)}


@dataclasses.dataclass
class ScoreDistribution:
    """Histogram of a catalogue's pair scores. Counts are of scored pairs; multiply by `scale` to estimate
    the whole catalogue's (1 when every pair was scored)."""

    score: str                      # "angular_similarity" | "knn_normalised"
    edges: np.ndarray               # (BINS + 1,) ascending bin edges; the last bin is closed
    impostor: np.ndarray            # (BINS,) int64: pairs not known to be duplicates (all pairs without truth)
    genuine: np.ndarray | None      # (BINS,) int64: the truth's pairs among the templates (None: no truth)
    items: int                      # N, the catalogue's templates
    items_scored: int               # n, the items whose pairs were scored
    scale: float                    # N(N-1) / (n(n-1))
    borderline: list                # [(i, j, score)] highest pairs below the threshold, best first

    @property
    def exhaustive(self) -> bool:
        return self.items_scored == self.items

    def at_or_above(self, counts: np.ndarray) -> np.ndarray:
        """Pairs scoring >= each lower bin edge (edges[:-1]): cumulative counts from the top, (BINS,)."""
        return np.cumsum(np.asarray(counts)[::-1])[::-1]

    def to_json(self, max_bins: int = 200) -> dict:
        """A compact histogram for report.json: `max_bins` bins merged from the fine ones, over the scored
        range (empty tails dropped), counts as scored (scale says how to estimate the catalogue's)."""
        total = self.impostor + (0 if self.genuine is None else self.genuine)
        nz = np.nonzero(total)[0]
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, len(total))
        step = max(1, -(-(hi - lo) // max_bins))
        cuts = np.arange(lo, hi, step)
        merge = lambda c: [int(v) for v in np.add.reduceat(np.asarray(c)[lo:hi], cuts - lo)]  # noqa: E731
        return {
            "of": "all pairs of the catalogue" if self.exhaustive else
                  f"all pairs of a random subset of {self.items_scored} of the {self.items} items",
            "score": self.score,
            "bin_edges": [float(self.edges[c]) for c in cuts] + [float(self.edges[hi])],
            "impostor_counts": merge(self.impostor),
            "genuine_counts": None if self.genuine is None else merge(self.genuine),
            "items": self.items, "items_scored": self.items_scored, "exhaustive": self.exhaustive,
            "scale": self.scale,
        }


def _bin(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each value on `edges` (clipped into the range; the last bin closed)."""
    return np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)


def pair_score_distribution(emb: np.ndarray, threshold: float, *, score: str = "angular_similarity",
                            b: np.ndarray | None = None, beta: float = 0.0,
                            groups: np.ndarray | None = None, max_items: int = EXACT_ITEMS,
                            bins: int = BINS, borderline: int = BORDERLINE, block: int = 2048,
                            seed: int = 0) -> ScoreDistribution:
    """Score the pairs of unit rows `emb` (N, d) as described in the module docstring.

    Args:
      threshold: the run's threshold, in the score's units: the borderline pairs are the highest below it.
      score, b, beta: "angular_similarity", or "knn_normalised" with each row's b (N,) and beta.
      groups: (N,) the truth's group of each item (a singleton's own label), or None: pairs of one group
        are counted as genuine, all others as impostors.
      max_items: above this N, the pairs of a seeded random subset of max_items items are scored.
    """
    if score not in SCORE_RANGES:
        raise ValueError(f"score must be one of {sorted(SCORE_RANGES)}, got {score!r}")
    if (score == "knn_normalised") != (b is not None):
        raise ValueError("kNN-normalised scores need each item's b (and only they do)")
    emb = np.asarray(emb, np.float32)
    n_all = len(emb)
    edges = np.linspace(*SCORE_RANGES[score], bins + 1)
    rows = np.arange(n_all)
    if n_all > max_items:
        rows = np.sort(np.random.default_rng(seed).choice(n_all, max_items, replace=False))
    n = len(rows)
    sub, sub_b = emb[rows], None if b is None else np.asarray(b, np.float32)[rows]
    sub_groups = None if groups is None else np.asarray(groups)[rows]
    impostor = np.zeros(bins, np.int64)
    genuine_sub = np.zeros(bins, np.int64)
    best = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    threshold = np.float32(threshold)
    for a, s, upper in upper_pair_blocks(sub, block, sub_b, beta):
        same = np.zeros(s.shape, bool) if sub_groups is None else \
            sub_groups[a:a + block, None] == sub_groups[None, a:]
        impostor += np.bincount(_bin(s[upper & ~same], edges), minlength=bins)
        genuine_sub += np.bincount(_bin(s[upper & same], edges), minlength=bins)
        below = upper & (s < threshold)
        if borderline and below.any():
            values = s[below]
            if len(values) > borderline:  # only the block's `borderline` best can enter the overall best
                below &= s >= np.partition(values, len(values) - borderline)[len(values) - borderline]
            r, c = np.nonzero(below)
            vals = s[r, c]
            top = np.argpartition(-vals, min(borderline, len(vals)) - 1)[:borderline]
            cand = (np.concatenate([best[0], rows[r[top] + a]]), np.concatenate([best[1], rows[c[top] + a]]),
                    np.concatenate([best[2], vals[top]]))
            keep = np.argsort(-cand[2], kind="stable")[:borderline]
            best = tuple(x[keep] for x in cand)
    genuine = None
    if groups is not None:
        genuine = genuine_sub if n == n_all else _genuine_histogram(emb, np.asarray(groups), edges, b, beta)
    return ScoreDistribution(score=score, edges=edges, impostor=impostor, genuine=genuine, items=n_all,
                             items_scored=n, scale=(n_all * (n_all - 1)) / max(n * (n - 1), 1),
                             borderline=[(int(i), int(j), float(v)) for i, j, v in zip(*best)])


def run_score_distribution(emb: np.ndarray, threshold: dict, **kwargs) -> ScoreDistribution:
    """pair_score_distribution of a run's own score: `threshold` is match_run.json's threshold (its value,
    and which score it cuts); for kNN-normalised scores each item's b is computed as match computed it
    (knn_norm.catalogue_b: the k-th most similar other item of the whole catalogue). Other keyword
    arguments go to pair_score_distribution."""
    score = threshold.get("score", "angular_similarity")
    b, beta = None, 0.0
    if score == "knn_normalised":
        beta = float(threshold["knn"]["beta"])
        b = kth_neighbour_similarity(emb, emb, int(threshold["knn"]["k"]), same_set=True)
    return pair_score_distribution(emb, float(threshold["value"]), score=score, b=b, beta=beta, **kwargs)


def _genuine_histogram(emb: np.ndarray, groups: np.ndarray, edges: np.ndarray, b, beta) -> np.ndarray:
    """Histogram of every within-group pair's score (the truth's pairs are few: scored directly)."""
    order = np.argsort(groups, kind="stable")
    _, starts, sizes = np.unique(groups[order], return_index=True, return_counts=True)
    counts = np.zeros(len(edges) - 1, np.int64)
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        members = order[start:start + size]
        i, j = np.triu_indices(size, 1)
        s = angular_similarity(np.einsum("kd,kd->k", emb[members[i]], emb[members[j]]))
        if b is not None:
            s = knn_normalised(s, b[members[i]], b[members[j]], beta)
        counts += np.bincount(_bin(s, edges), minlength=len(counts))
    return counts


def curves(dist: ScoreDistribution, targets=TARGET_FMRS) -> dict:
    """Error curves of a distribution with genuine pairs (see the module docstring), JSON-ready.

    Thresholds are the bin edges; at threshold t a pair matches when its score >= t. FMR = impostor pairs
    matched / impostor pairs scored; TMR = genuine pairs matched / genuine pairs (FNMR = 1 - TMR);
    precision = genuine matched / (genuine matched + impostors matched x scale), i.e. estimated over the
    whole catalogue. Targets need at least RULE_OF_THREE / target impostor pairs scored; smaller targets
    are listed with reached = False and why.
    """
    if dist.genuine is None or not dist.genuine.sum():
        raise ValueError("error curves need the truth's genuine pairs")
    t = dist.edges[:-1]
    fm, tm = dist.at_or_above(dist.impostor), dist.at_or_above(dist.genuine)
    n_imp, n_gen = int(dist.impostor.sum()), int(dist.genuine.sum())
    fmr, tmr = fm / max(n_imp, 1), tm / n_gen
    # ROC from (0, 0) (threshold above everything) to (1, 1): the trapezoid area is the AUC with ties
    # inside one bin counted as half, as the rank AUC counts them.
    x = np.concatenate([[0.0], fmr[::-1]])
    y = np.concatenate([[0.0], tmr[::-1]])
    auc = float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))
    fnmr = 1.0 - tmr
    k = int(np.argmin(np.abs(fmr - fnmr)))
    predicted = tm + fm * dist.scale
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tm / predicted, np.nan)
    at_fmr = []
    for target in targets:
        row = {"target_fmr": float(target), "impostor_pairs": n_imp}
        if n_imp < RULE_OF_THREE / target:
            at_fmr.append({**row, "reached": False, "threshold": None,
                           "why": f"{n_imp} impostor pairs judge an FMR down to about {RULE_OF_THREE / n_imp:.1e} "
                                  "(rule of three)"})
            continue
        ok = np.nonzero(fmr <= target)[0]
        if not len(ok):
            at_fmr.append({**row, "reached": False, "threshold": None, "why": "no threshold on the grid reaches it"})
            continue
        a = int(ok[0])  # the lowest threshold at or under the target
        low, high = rate_interval_95(int(fm[a]), n_imp)
        at_fmr.append({**row, "reached": True, "threshold": float(t[a]), "false_matches": int(fm[a]),
                       "fmr": float(fmr[a]), "fmr_95": [low, high], "tmr": float(tmr[a]),
                       "fnmr": float(fnmr[a])})
    keep = _thin(fmr, tmr)
    return {
        "genuine_pairs": n_gen, "impostor_pairs": n_imp, "impostor_scale": dist.scale, "auc": auc,
        "eer": {"rate": float((fmr[k] + fnmr[k]) / 2), "threshold": float(t[k])},
        "at_fmr": at_fmr,
        "points": [{"threshold": float(t[i]), "fmr": float(fmr[i]), "tmr": float(tmr[i]),
                    "precision": None if np.isnan(precision[i]) else float(precision[i])} for i in keep],
        "resolution": float(dist.edges[1] - dist.edges[0]),
    }


def _thin(fmr: np.ndarray, tmr: np.ndarray, points: int = 400) -> np.ndarray:
    """Indices of at most ~`points` thresholds where the ROC moves (for plots and report.json)."""
    moved = np.nonzero((np.diff(fmr, prepend=-1) != 0) | (np.diff(tmr, prepend=-1) != 0))[0]
    if len(moved) > points:
        moved = moved[np.unique(np.linspace(0, len(moved) - 1, points).astype(int))]
    return moved


def predicted_pairs(dist: ScoreDistribution, thresholds: np.ndarray) -> np.ndarray:
    """Estimated pairs of the whole catalogue scoring >= each threshold (float (len(thresholds),))."""
    total = dist.impostor + (0 if dist.genuine is None else dist.genuine)
    cum = np.append(dist.at_or_above(total), 0)
    return cum[np.clip(np.searchsorted(dist.edges, thresholds, side="left"), 0, len(cum) - 1)] * dist.scale
