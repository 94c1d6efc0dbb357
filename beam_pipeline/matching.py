"""Exact all-pairs matching of unit embeddings, blocked so no N x N matrix is ever held (pure NumPy).

The catalogue (n items) is cut into blocks of `block_size` rows. `block_pairs` lists
the block pairs (i <= j) that together cover every unordered pair of items once; the match pipeline
spreads them across workers and calls `pairs_above_threshold` on each. The kernel multiplies one tile
(a row chunk of the left block by a column chunk of the right) at a time into a preallocated, cache-sized
buffer, takes each row's maximum in one pass and extracts pairs only from the rare rows whose maximum
reaches the threshold; the block's full similarity matrix never exists, and each similarity is written
once and read once while it is still in cache. Threads split the tiles, each with single-threaded BLAS,
so thresholding runs on every core.

Similarity is the dot product of L2-normalised float32 rows (siamese_core.similarity): thresholds arrive as
cosine (convert an angular threshold with siamese_core.similarity.cosine_from_angular).
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np

from schemas.tables import UNIT_NORM_TOLERANCE, unit_vector_problems

# Size of one similarity tile. Small enough to stay in L2/L3 cache, so the row-max pass reads it from
# cache right after the matmul wrote it; large enough that each matmul is a well-shaped GEMM (measured
# on 8192 x 8192 x 128: 256 x 2048 tiles, one BLAS thread per kernel thread, beat both one full-block
# product and 64-row x 8192 strips).
TILE_BYTES = 2 * 1024 * 1024
TILE_COLS = 2048
CHUNK_BYTES = TILE_BYTES  # the name the benchmark used


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
    nonfinite, bad, norms = unit_vector_problems(x)
    if nonfinite.size:
        row = int(nonfinite[0])
        raise ValueError(f"{name}: row {row} has NaN or infinite values; embeddings must be finite unit vectors")
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


def _tile_shape(m: int, chunk_rows: int | None) -> tuple[int, int]:
    """(rows, cols) of one similarity tile: ~TILE_BYTES, at most TILE_COLS columns wide."""
    cols = max(1, min(m, TILE_COLS))
    rows = int(chunk_rows) if chunk_rows else max(1, min(4096, TILE_BYTES // (4 * cols)))
    return rows, cols


_CONTROLLER = None
_EXECUTORS: dict[int, ThreadPoolExecutor] = {}
_EXECUTOR_LOCK = threading.Lock()


def _blas_single_thread():
    """Context manager limiting BLAS to one thread (the kernel's own threads spread the work instead)."""
    global _CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return contextlib.nullcontext()
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def _executor(threads: int) -> ThreadPoolExecutor:
    with _EXECUTOR_LOCK:
        ex = _EXECUTORS.get(threads)
        if ex is None:
            ex = _EXECUTORS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="match-kernel")
        return ex


def default_threads() -> int:
    """Kernel threads when none are asked for: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _scan_rows(left, right, threshold, same_block, row_starts, rows, cols):
    """The kernel's inner loop over the row chunks starting at `row_starts` (one thread's share).

    Per tile: one matmul into a reused buffer, one row-wise max (a single SIMD pass over the tile, while it
    is in cache), and only for the rare rows whose max reaches the threshold a compare + flatnonzero.
    """
    n, m = left.shape[0], right.shape[0]
    buf = np.empty(rows * cols, np.float32)
    rowmax = np.empty(rows, np.float32)
    out_i, out_j, out_c = [], [], []
    for start in row_starts:
        stop = min(n, start + rows)
        r = stop - start
        lhs = left[start:stop]
        # Same block: rows [start, stop) only pair with columns > their own index (upper triangle).
        col_begin = start if same_block else 0
        for c0 in range(col_begin, m, cols):
            c1 = min(m, c0 + cols)
            c = c1 - c0
            s = buf[: r * c].reshape(r, c)
            np.matmul(lhs, right[c0:c1].T, out=s)
            np.max(s, axis=1, out=rowmax[:r])
            hit_rows = np.flatnonzero(rowmax[:r] >= threshold)
            if not hit_rows.size:
                continue
            sub = s[hit_rows]
            flat = np.flatnonzero(sub >= threshold)
            hi, lj = np.divmod(flat, c)
            ci = hit_rows[hi].astype(np.int64) + start
            cj = lj.astype(np.int64) + c0
            cos = sub.reshape(-1)[flat]
            if same_block:
                keep = cj > ci
                ci, cj, cos = ci[keep], cj[keep], cos[keep]
            if len(ci):
                out_i.append(ci)
                out_j.append(cj)
                out_c.append(cos)
    return out_i, out_j, out_c


def pairs_above_threshold(
    left: np.ndarray,
    right: np.ndarray,
    cos_threshold: float,
    *,
    same_block: bool,
    chunk_rows: int | None = None,
    threads: int | None = None,
    check: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i, j) of rows of `left` (n, d) and `right` (m, d) with cosine >= `cos_threshold`.

    Both are float32 unit rows (checked unless `check=False`, for blocks validated when staged). With
    `same_block`, `left` and `right` are the same block: only pairs i < j are returned (no self pairs,
    each unordered pair once) and only the upper triangle is computed. Returns (i int64 (k,), j int64
    (k,), cos float32 (k,)) sorted by (i, j); i indexes `left`, j indexes `right`. The comparison is exact
    for the float32 similarity: cos >= cos_threshold.

    Work is done one tile (`chunk_rows` rows x up to TILE_COLS columns, default ~2 MiB) at a time into
    reused buffers, so memory is O(tile) whatever the block size. `threads` > 1 splits the row chunks
    over that many threads, each running single-threaded BLAS and its own thresholding, so the scan runs
    on every core instead of one core idling while the other thresholds (None: one thread, BLAS as
    configured; 1: one thread with single-threaded BLAS, for runners with one worker process per core).
    """
    if check:
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
    if chunk_rows is not None and int(chunk_rows) <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    threshold = float32_threshold(cos_threshold)
    rows, cols = _tile_shape(m, chunk_rows)
    starts = list(range(0, n, rows))
    if threads is None:  # one stream, BLAS threaded as configured
        parts = [_scan_rows(left, right, threshold, same_block, starts, rows, cols)]
    elif min(int(threads), len(starts)) <= 1:  # asked for one thread: BLAS too (one worker process per core)
        with _blas_single_thread():
            parts = [_scan_rows(left, right, threshold, same_block, starts, rows, cols)]
    else:
        threads = min(int(threads), len(starts))
        # Interleaved shares: on a diagonal block the first row chunks hold the most columns.
        shares = [starts[t::threads] for t in range(threads)]
        with _blas_single_thread():
            parts = list(_executor(threads).map(
                lambda share: _scan_rows(left, right, threshold, same_block, share, rows, cols), shares))
    out_i = [a for p in parts for a in p[0]]
    if not out_i:
        return empty
    i = np.concatenate(out_i)
    j = np.concatenate([a for p in parts for a in p[1]])
    cos = np.concatenate([a for p in parts for a in p[2]]).astype(np.float32, copy=False)
    order = np.lexsort((j, i))
    return i[order], j[order], cos[order]


def match_block_pair(
    embeddings: np.ndarray, block_i: int, block_j: int, block_size: int, cos_threshold: float,
    threads: int | None = None,
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
    i, j, cos = pairs_above_threshold(left, right, cos_threshold, same_block=same, threads=threads)
    return i + a0, j + b0, cos


def top_k_per_row(i: np.ndarray, j: np.ndarray, cos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep, for each distinct `i`, the `k` pairs of highest cosine (ties: smaller j first); k <= 0 keeps all.

    Returns (i, j, cos) sorted by i, then cosine descending, then j. Used by 1:N search: the pairs of one
    query found in several catalogue blocks are merged by calling this again on their union.
    """
    i = np.asarray(i, np.int64)
    j = np.asarray(j, np.int64)
    cos = np.asarray(cos, np.float32)
    order = np.lexsort((j, -cos.astype(np.float64), i))
    i, j, cos = i[order], j[order], cos[order]
    if k is None or k <= 0 or not len(i):
        return i, j, cos
    first = np.r_[0, np.flatnonzero(i[1:] != i[:-1]) + 1]
    rank = np.arange(len(i)) - np.repeat(first, np.diff(np.r_[first, len(i)]))
    keep = rank < k
    return i[keep], j[keep], cos[keep]


def pair_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of matching rows of unit float32 `a` and `b` (k, d) -> float32 (k,) (1:1 verification)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        raise ValueError(f"pair rows differ in shape: {a.shape} vs {b.shape}")
    return np.einsum("kd,kd->k", a, b).astype(np.float32, copy=False)


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
