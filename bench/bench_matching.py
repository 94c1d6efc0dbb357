"""Throughput of the blocked all-pairs kernel (beam_pipeline.matching) against plain baselines.

    .venv/bin/python bench/bench_matching.py [--items 8192] [--dim 64] [--block_size 2048] [--repeats 3]

All methods cover the same n*(n-1)/2 pairs of random unit vectors (with some planted near-copies, so
pairs do pass the threshold), block pair by block pair, in this process:
- kernel: matching.match_block_pair (row-chunked matmul into a reused buffer, threshold, extract);
- bare matmul: `left @ right.T` for the same block shapes and nothing else (no thresholding, no
  extraction, full diagonal blocks, a fresh block-sized output each time); the ratio column is time / this;
- the kernel's chunked matmuls alone: its own products (same chunks, upper triangle only on diagonal
  blocks) without threshold or extraction, so kernel / this is the cost of keeping only the pairs;
- full block + nonzero: the unchunked way, `np.nonzero(left @ right.T >= t)` per block pair;
- scipy loop: scipy.spatial.distance.cosine per pair on a sample of pairs, extrapolated as pairs/s.
Best of `--repeats` interleaved runs. Defaults finish in well under a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from beam_pipeline import matching  # noqa: E402
from trainer.distances import cosine_from_angular, l2_normalize  # noqa: E402


def _catalogue(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    copies = np.arange(1, n, 50)  # one near-copy every 50 rows
    x[copies] = x[copies - 1] + 0.1 * rng.standard_normal((len(copies), d)).astype(np.float32)
    return l2_normalize(x)


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--block_size", type=int, default=2048)
    parser.add_argument("--threshold", type=float, default=0.85, help="angular similarity (default 0.85)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scipy_pairs", type=int, default=20000, help="pairs in the scipy loop sample")
    args = parser.parse_args(argv)

    x = _catalogue(args.items, args.dim)
    n, bs = len(x), args.block_size
    cos_t = float(cosine_from_angular(args.threshold))
    blocks = matching.block_pairs(n, bs)
    pairs_total = n * (n - 1) // 2

    def kernel():
        return sum(len(matching.match_block_pair(x, bi, bj, bs, cos_t)[0]) for bi, bj in blocks)

    def bare():
        for bi, bj in blocks:
            a0, a1 = matching.block_bounds(bi, n, bs)
            b0, b1 = matching.block_bounds(bj, n, bs)
            x[a0:a1] @ x[b0:b1].T

    def chunk_matmuls():
        # The kernel's matrix products alone (same row chunks, upper triangle on diagonal blocks, same
        # reused buffer), without threshold or extraction: what the kernel adds on top is the rest.
        rows = matching._chunk_rows(bs, matching.CHUNK_BYTES)
        buf = np.empty(rows * bs, np.float32)
        for bi, bj in blocks:
            a0, a1 = matching.block_bounds(bi, n, bs)
            b0, b1 = matching.block_bounds(bj, n, bs)
            left, right = x[a0:a1], x[b0:b1]
            for start in range(0, len(left), rows):
                stop = min(len(left), start + rows)
                col0 = start if bi == bj else 0
                out = buf[: (stop - start) * (len(right) - col0)].reshape(stop - start, len(right) - col0)
                np.matmul(left[start:stop], right[col0:].T, out=out)

    t32 = matching.float32_threshold(cos_t)

    def full_block():
        found = 0
        for bi, bj in blocks:
            a0, a1 = matching.block_bounds(bi, n, bs)
            b0, b1 = matching.block_bounds(bj, n, bs)
            i, j = np.nonzero(x[a0:a1] @ x[b0:b1].T >= t32)
            if bi == bj:
                i, j = i[j > i], j[j > i]
            found += len(i)
        return found

    # Interleaved repeats, best of each: load from other processes drifts, and hits all methods alike.
    methods = {"bare": bare, "chunks": chunk_matmuls, "kernel": kernel, "full": full_block}
    best = {name: float("inf") for name in methods}
    results = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t, results[name] = _best(fn, 1)
            best[name] = min(best[name], t)
    t_bare, t_chunks, t_kernel, t_full = best["bare"], best["chunks"], best["kernel"], best["full"]
    found, found_full = results["kernel"], results["full"]
    if found != found_full:
        raise AssertionError(f"kernel found {found} pairs, the full-block reference {found_full}")

    from scipy.spatial.distance import cosine as scipy_cosine

    rng = np.random.default_rng(1)
    i = rng.integers(0, n, args.scipy_pairs)
    j = rng.integers(0, n, args.scipy_pairs)
    xd = x.astype(np.float64)

    def scipy_loop():
        return [1.0 - scipy_cosine(xd[a], xd[b]) for a, b in zip(i.tolist(), j.tolist())]

    t_scipy_sample, _ = _best(scipy_loop, 1)
    t_scipy = t_scipy_sample * pairs_total / args.scipy_pairs

    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(sorted({f"{p.get('internal_api')} {p.get('num_threads')} threads"
                                 for p in threadpool_info() if p.get("user_api") == "blas"}))
    except ImportError:
        blas = "unknown"
    print(f"items {n}, dim {args.dim}, block size {bs} ({len(blocks)} block pairs), "
          f"{pairs_total:,} pairs, threshold {args.threshold} angular (cos {cos_t:.4f}), {found} pairs found")
    print(f"numpy {np.__version__}, BLAS: {blas}, cpu count {os.cpu_count()}")
    rows = [
        ("bare float32 matmul, same blocks", t_bare),
        ("kernel's chunked matmuls alone", t_chunks),
        ("kernel (matching.match_block_pair)", t_kernel),
        ("full block matmul + nonzero", t_full),
        (f"scipy cosine loop (sample {args.scipy_pairs})", t_scipy),
    ]
    print(f"{'method':<40}{'seconds':>12}{'pairs/s':>16}{'time / bare':>14}")
    for name, t in rows:
        print(f"{name:<40}{t:>12.3f}{pairs_total / t:>16.3e}{t / t_bare:>14.2f}")
    return {name: {"seconds": t, "pairs_per_s": pairs_total / t, "ratio_to_bare": t / t_bare} for name, t in rows}


if __name__ == "__main__":
    main()
