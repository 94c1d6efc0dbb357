"""Exact all-pairs matching of unit embeddings, blocked so no N x N matrix is ever held (pure NumPy).

The catalogue (n items, sorted by item_id) is cut into blocks of `block_size` rows. `block_pairs` lists
the block pairs (i <= j) that together cover every unordered pair of items once; the match pipeline
spreads them across workers and calls `pairs_above_threshold` on each. The kernel multiplies one
row-chunk of the left block at a time into a preallocated, cache-sized buffer, compares it with the
threshold into a preallocated mask and extracts the few surviving pairs; the block's full similarity
matrix never exists, and each similarity is written once and read once while it is still in cache.

Similarity is the dot product of L2-normalised float32 rows (trainer.distances): thresholds arrive as
cosine (convert an angular threshold with trainer.distances.cosine_from_angular).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

# Size of the per-chunk similarity buffer. Small enough to stay in L2/L3 cache so the compare and the
# nonzero scan read it from cache, large enough that each matmul call is a reasonably shaped GEMM
# (measured on 4096 x 4096 x 64 blocks: 1-4 MiB chunks ~2x faster than one full-block matmul + scan).
CHUNK_BYTES = 2 * 1024 * 1024
UNIT_NORM_TOLERANCE = 1e-3


def block_pairs(n: int, block_size: int) -> list[tuple[int, int]]:
    """Block pairs (block_i, block_j), block_i <= block_j, covering all pairs of `n` rows once.

    Rows [b * block_size, (b + 1) * block_size) form block b; there are ceil(n / block_size) blocks and
    nb * (nb + 1) / 2 block pairs. n = 0 gives no block pairs.
    """
    n, block_size = int(n), int(block_size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    nb = -(-n // block_size)
    return [(i, j) for i in range(nb) for j in range(i, nb)]


def block_bounds(block: int, n: int, block_size: int) -> tuple[int, int]:
    """Row range [start, stop) of block `block` among `n` rows."""
    start = int(block) * int(block_size)
    if not 0 <= start < n:
        raise ValueError(f"block {block} is outside {n} rows of block size {block_size}")
    return start, min(n, start + int(block_size))


def float32_threshold(cos_threshold: float) -> np.float32:
    """The smallest float32 >= `cos_threshold`.

    float32 similarities compared with it give exactly `cos >= cos_threshold` (a plain float32 cast could
    round the threshold down and admit a pair just below it).
    """
    t = np.float32(cos_threshold)
    if float(t) < float(cos_threshold):
        t = np.nextafter(t, np.float32(np.inf))
    return np.float32(t)


def check_embeddings(x: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """Refuse anything but a finite (n, d) float32 matrix of unit rows; returns it C-contiguous.

    Raises ValueError naming the first bad row. NaN rows would otherwise silently never match.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (items, dim) array, got shape {x.shape}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {x.dtype}")
    if x.shape[0] == 0:
        return np.ascontiguousarray(x)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{name}: row {row} has NaN or infinite values; embeddings must be finite unit vectors")
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"{name}: row {row} has norm {norms[row]:.6f}; embeddings must be L2-normalised unit vectors "
            f"({bad.size} rows off by more than {UNIT_NORM_TOLERANCE})"
        )
    return np.ascontiguousarray(x)


def check_catalogue(item_ids: Sequence[str], embeddings: np.ndarray, model_ids: Iterable[str]) -> str:
    """Refuse a catalogue that cannot be matched; returns its single model_id.

    Checks, before any work: one model_id (templates of two encoders are not comparable), unique item
    ids, one row per id, finite unit embeddings. Raises ValueError with the reason.
    """
    models = sorted(set(model_ids))
    if len(models) > 1:
        raise ValueError(
            f"templates come from {len(models)} different models {models[:5]}; embeddings of different "
            "encoders are not comparable: re-embed with one model"
        )
    ids = list(item_ids)
    if len(ids) != len(embeddings):
        raise ValueError(f"{len(ids)} item ids but {len(embeddings)} embeddings")
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for item in ids:
            if item in seen:
                dup = item
                break
            seen.add(item)
        raise ValueError(f"duplicate item_id {dup!r} in templates; item ids must be unique")
    check_embeddings(embeddings)
    return models[0] if models else ""


def _chunk_rows(m: int, chunk_bytes: int) -> int:
    return max(1, min(4096, chunk_bytes // (4 * max(1, m))))


def pairs_above_threshold(
    left: np.ndarray,
    right: np.ndarray,
    cos_threshold: float,
    *,
    same_block: bool,
    chunk_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i, j) of rows of `left` (n, d) and `right` (m, d) with cosine >= `cos_threshold`.

    Both are float32 unit rows (checked). With `same_block`, `left` and `right` are the same block: only
    pairs i < j are returned (no self pairs, each unordered pair once) and only the upper triangle is
    computed. Returns (i int64 (k,), j int64 (k,), cos float32 (k,)) sorted by (i, j); i indexes `left`,
    j indexes `right`. The comparison is exact for the float32 similarity: cos >= cos_threshold.

    Work is done one row-chunk at a time (`chunk_rows` rows, default: a ~2 MiB buffer) into reused
    buffers, so memory is O(chunk_rows * m) whatever the block size.
    """
    left = check_embeddings(left, "left")
    right = left if right is left else check_embeddings(right, "right")
    if left.shape[1] != right.shape[1]:
        raise ValueError(f"left has dimension {left.shape[1]} but right has {right.shape[1]}")
    if same_block and left.shape != right.shape:
        raise ValueError(f"same_block needs left and right of one shape, got {left.shape} and {right.shape}")
    n, m = left.shape[0], right.shape[0]
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    if n == 0 or m == 0:
        return empty
    threshold = float32_threshold(cos_threshold)
    rows = int(chunk_rows) if chunk_rows else _chunk_rows(m, CHUNK_BYTES)
    if rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    sims = np.empty(rows * m, np.float32)
    mask = np.empty(rows * m, np.bool_)
    out_i, out_j, out_c = [], [], []
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        # Same block: rows [start, stop) only pair with columns >= start (upper triangle).
        col0 = start if same_block else 0
        r, c = stop - start, m - col0
        if c <= 0:
            break
        s = sims[: r * c].reshape(r, c)
        k = mask[: r * c].reshape(r, c)
        np.matmul(left[start:stop], right[col0:].T, out=s)
        np.greater_equal(s, threshold, out=k)
        # Most chunks hold no pair: any() is ~30x cheaper than a scan that collects indices. 1-D
        # flatnonzero + divmod is ~20x faster than 2-D np.nonzero (measured, numpy 2.4).
        if not k.any():
            continue
        flat = np.flatnonzero(k)
        cos = s.reshape(-1)[flat]
        li, lj = np.divmod(flat, c)
        ci = li.astype(np.int64) + start
        cj = lj.astype(np.int64) + col0
        if same_block:
            keep = cj > ci
            ci, cj, cos = ci[keep], cj[keep], cos[keep]
        out_i.append(ci)
        out_j.append(cj)
        out_c.append(cos)
    if not out_i:
        return empty
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_c).astype(np.float32, copy=False)


def match_block_pair(
    embeddings: np.ndarray, block_i: int, block_j: int, block_size: int, cos_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs above threshold between blocks `block_i` <= `block_j` of `embeddings` (n, d).

    Returns global row indices (i int64, j int64, cos float32) with i < j.
    """
    if block_i > block_j:
        raise ValueError(f"block pairs need block_i <= block_j, got ({block_i}, {block_j})")
    n = len(embeddings)
    a0, a1 = block_bounds(block_i, n, block_size)
    b0, b1 = block_bounds(block_j, n, block_size)
    same = block_i == block_j
    left = embeddings[a0:a1]
    right = left if same else embeddings[b0:b1]
    i, j, cos = pairs_above_threshold(left, right, cos_threshold, same_block=same)
    return i + a0, j + b0, cos


def orient_pairs(
    left_ids: Sequence[str], right_ids: Sequence[str]
) -> tuple[list[str], list[str], np.ndarray]:
    """Put each pair in (smaller id, larger id) order; returns (left, right, swapped bool (k,)).

    Pairs of an item with itself are refused (ValueError).
    """
    lo, hi, swapped = [], [], np.zeros(len(left_ids), np.bool_)
    for k, (a, b) in enumerate(zip(left_ids, right_ids)):
        if a == b:
            raise ValueError(f"pair of item {a!r} with itself")
        if b < a:
            a, b = b, a
            swapped[k] = True
        lo.append(a)
        hi.append(b)
    return lo, hi, swapped
