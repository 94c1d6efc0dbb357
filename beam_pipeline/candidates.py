"""Approximate all-pairs matching: k-means partitions with multi-assignment (pure NumPy).

Only pairs that share a partition are compared, so the work is the sum over partitions of
size x (size + guests) instead of n^2 / 2:

1. `spherical_kmeans` learns `k` unit centroids from a sample of the catalogue.
2. `assign_partitions` gives every item a *home* (its nearest centroid) and makes it a *guest* of the
   other partitions whose centroid lies within an angular margin of 2 * theta_t of its home's
   (theta_t = arccos(cosine threshold)), at most `max_assign` partitions in all. If a and b match
   (angle <= theta_t) and Q is b's home, then angle(a, Q) <= angle(b, Q) + theta_t <= angle(b, home(a)) +
   theta_t <= angle(a, home(a)) + 2 theta_t, so Q lies within a's margin: with no cap, a is a guest of
   b's home and the pair is found. The cap (`max_assign`) is what makes the search approximate; items
   whose margin held more partitions than the cap are counted (`capped`) and the recall that costs is
   measured against exact search on a sample in every run (match pipeline, report).
3. `partition_pairs` compares, within one partition, home x home (each pair once) and home x guest, and
   drops a home x guest pair that the partition of the guest's home also finds, so each pair is
   reported by exactly one partition.
"""
from __future__ import annotations

import math

import numpy as np

from beam_pipeline import matching


def default_partitions(n: int, target_size: int = 2048) -> int:
    """Partitions for n items: about `target_size` homes each, at least 1."""
    return max(1, int(math.ceil(n / max(1, target_size))))


def spherical_kmeans(x: np.ndarray, k: int, *, iters: int = 10, seed: int = 0) -> np.ndarray:
    """`k` unit centroids (k, d) float32 of unit rows `x` (s, d) by spherical k-means (cosine assignment).

    Initialised from `k` distinct random rows (seeded: deterministic); a centroid that loses every row is
    re-seeded with the row farthest from its own centroid. k > s gives s centroids.
    """
    x = np.ascontiguousarray(x, np.float32)
    s = len(x)
    if s == 0:
        raise ValueError("k-means needs at least one sample row")
    k = max(1, min(int(k), s))
    rng = np.random.default_rng(seed)
    c = x[rng.choice(s, k, replace=False)].copy()
    for _ in range(int(iters)):
        sims = x @ c.T
        label = np.argmax(sims, axis=1)
        best = sims[np.arange(s), label]
        new = np.zeros_like(c)
        np.add.at(new, label, x)
        counts = np.bincount(label, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            far = np.argsort(best, kind="stable")[: empty.size]
            new[empty] = x[far]
        norms = np.linalg.norm(new, axis=1, keepdims=True)
        c = (new / np.maximum(norms, 1e-12)).astype(np.float32)
    return c


def assign_partitions(
    emb: np.ndarray, centroids: np.ndarray, cos_threshold: float, max_assign: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Home and guest partitions of rows `emb` (n, d).

    Returns (assign int32 (n, max_assign): partitions nearest first, column 0 the home, -1 padding;
    capped bool (n,): the margin held more partitions than `max_assign`; best_cos float32 (n,)).
    """
    if max_assign < 1:
        raise ValueError(f"max_assign must be >= 1, got {max_assign}")
    n, k = len(emb), len(centroids)
    m = min(int(max_assign), k)
    assign = np.full((n, int(max_assign)), -1, np.int32)
    if n == 0:
        return assign, np.zeros(0, np.bool_), np.zeros(0, np.float32)
    sims = np.asarray(emb, np.float32) @ np.asarray(centroids, np.float32).T
    if m < k:
        top = np.argpartition(-sims, m - 1, axis=1)[:, :m]
    else:
        top = np.broadcast_to(np.arange(k), (n, k)).copy()
    top_sims = np.take_along_axis(sims, top, axis=1)
    order = np.argsort(-top_sims, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    top_sims = np.take_along_axis(top_sims, order, axis=1)
    theta_t = float(np.arccos(np.clip(cos_threshold, -1.0, 1.0)))
    best_angle = np.arccos(np.clip(top_sims[:, :1].astype(np.float64), -1.0, 1.0))
    limit = np.cos(np.minimum(best_angle + 2.0 * theta_t, np.pi))  # cosine of the margin's edge
    # float32 products: a hair of slack so a centroid exactly on the margin is not lost to rounding.
    within = top_sims.astype(np.float64) >= limit - 1e-6
    within[:, 0] = True
    assign[:, :m] = np.where(within, top, -1)
    in_margin = (sims.astype(np.float64) >= limit - 1e-6).sum(axis=1)
    capped = in_margin > m
    return assign, capped, top_sims[:, 0].astype(np.float32)


def partition_pairs(
    partition: int,
    rows: np.ndarray,
    emb: np.ndarray,
    assign: np.ndarray,
    cos_threshold: float,
    *,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Pairs at or above the threshold among the members of one partition, each reported once overall.

    rows int64 (r,): global rows of the members; emb (r, d); assign (r, max_assign) their assignments
    (column 0 = home). Returns (global i, global j, cos, products computed), i < j not implied.
    """
    rows = np.asarray(rows, np.int64)
    order = np.argsort(rows, kind="stable")
    rows, emb, assign = rows[order], np.ascontiguousarray(emb[order]), assign[order]
    home = assign[:, 0] == partition
    h_idx, g_idx = np.flatnonzero(home), np.flatnonzero(~home)
    h_emb, g_emb = emb[h_idx], emb[g_idx]
    out_i, out_j, out_c = [], [], []
    i, j, c = matching.pairs_above_threshold(h_emb, h_emb, cos_threshold, same_block=True, threads=threads,
                                             check=False)
    out_i.append(rows[h_idx[i]])
    out_j.append(rows[h_idx[j]])
    out_c.append(c)
    products = len(h_idx) * (len(h_idx) - 1) // 2
    if len(g_idx) and len(h_idx):
        i, j, c = matching.pairs_above_threshold(h_emb, g_emb, cos_threshold, same_block=False, threads=threads,
                                                 check=False)
        products += len(h_idx) * len(g_idx)
        a, b = h_idx[i], g_idx[j]
        guest_home = assign[b, 0]
        # Also found by the guest's home partition iff the home member is a guest there: keep it in the
        # partition of smaller id only.
        dup = (assign[a] == guest_home[:, None]).any(axis=1)
        keep = ~dup | (partition < guest_home)
        out_i.append(rows[a[keep]])
        out_j.append(rows[b[keep]])
        out_c.append(c[keep])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_c).astype(np.float32), products


def recall_estimate(found: int, total: int) -> dict:
    """{"recall", "found", "pairs", "recall_lower_95"}: found of total exact pairs, with a one-sided 95%
    Clopper-Pearson lower bound (None without pairs)."""
    if total <= 0:
        return {"recall": None, "found": int(found), "pairs": int(total), "recall_lower_95": None}
    if found <= 0:
        lower = 0.0
    else:
        from scipy.stats import beta

        lower = float(beta.ppf(0.05, found, total - found + 1))
    return {"recall": found / total, "found": int(found), "pairs": int(total), "recall_lower_95": lower}
