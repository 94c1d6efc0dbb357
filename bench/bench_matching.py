"""Throughput of the similarity kernel (beam_pipeline.matching) against plain baselines and faiss.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_matching.py [--block 8192] [--dim 128] [--repeats 5]

Two blocks `a`, `b` of `--block` rows of synthetic 128-d templates (bench/synthetic.py: clustered, with
planted near-copies, shuffled so copies fall on both sides: there are pairs above the threshold). Every
method covers the same block * block pairs of a against b:
- bare matmul: `a @ b.T`, NumPy float32 with its default BLAS threads, nothing else (the baseline);
- bare matmul, kernel threading: the same product split over the kernel's threads, each with
  single-threaded BLAS, still nothing else (what the kernel's own arrangement costs without thresholding);
- naive scan: `np.nonzero(a @ b.T >= t)`;
- kernel: matching.pairs_above_threshold(a, b, t, threads=default) (tiled product + row-max scan +
  extraction of the pairs), and the same with threads=1;
- faiss: IndexFlatIP over b, range_search with a (faiss's own threads), filtered to cosine >= t;
- scipy loop: scipy.spatial.distance.cosine per pair, the seed's way, timed on `--scipy_pairs` pairs.
Methods run interleaved, best of `--repeats`; the pair sets of naive, kernel and faiss are checked equal.
Ratios are within this run: the machine is shared and absolute rates drift.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import synthetic  # noqa: E402
from beam_pipeline import matching  # noqa: E402
from siamese_core.similarity import cosine_from_angular  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.9, help="angular similarity (default 0.9)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scipy_pairs", type=int, default=20000, help="pairs in the scipy loop sample")
    parser.add_argument("--no_faiss", action="store_true")
    parser.add_argument("--results", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    n = args.block
    x = synthetic.catalogue(2 * n, args.dim, seed=0, chunk=2 * n)
    x = x[np.random.default_rng(0).permutation(2 * n)]
    a, b = np.ascontiguousarray(x[:n]), np.ascontiguousarray(x[n:])
    cos_t = float(cosine_from_angular(args.threshold))
    t32 = matching.float32_threshold(cos_t)
    threads = matching.default_threads()
    pairs = n * n

    def bare():
        a @ b.T

    def bare_threaded():
        rows = 256

        def work(share):
            out = np.empty((rows, n), np.float32)
            for s in share:
                np.matmul(a[s:s + rows], b.T, out=out[: min(rows, n - s)])

        starts = list(range(0, n, rows))
        with matching._blas_single_thread():
            list(matching._executor(threads).map(work, [starts[k::threads] for k in range(threads)]))

    def naive():
        i, j = np.nonzero(a @ b.T >= t32)
        return set(zip(i.tolist(), j.tolist()))

    def kernel():
        i, j, _ = matching.pairs_above_threshold(a, b, cos_t, same_block=False, threads=threads)
        return set(zip(i.tolist(), j.tolist()))

    def kernel_1():
        i, j, _ = matching.pairs_above_threshold(a, b, cos_t, same_block=False, threads=1)
        return set(zip(i.tolist(), j.tolist()))

    methods = {"bare": bare, "bare_threaded": bare_threaded, "naive": naive, "kernel": kernel, "kernel_1": kernel_1}
    faiss_info = None
    if not args.no_faiss:
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatIP(args.dim)
        index.add(b)
        # range_search keeps similarities above the radius: ask a hair below and filter exactly.
        radius = float(np.nextafter(t32, np.float32(-1)))

        def faiss_range():
            lims, dist, labels = index.range_search(a, radius)
            keep = dist >= t32
            rows = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
            return set(zip(rows[keep].tolist(), labels[keep].tolist()))

        methods["faiss"] = faiss_range
        faiss_info = {"version": faiss.__version__, "omp_threads": faiss.omp_get_max_threads()}

    best = {k: float("inf") for k in methods}
    found = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            out = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            if out is not None:
                found[name] = out
    reference = found["naive"]
    for name, s in found.items():
        if s != reference:
            raise AssertionError(f"{name} found {len(s)} pairs, the naive scan {len(reference)}")

    from scipy.spatial.distance import cosine as scipy_cosine

    rng = np.random.default_rng(1)
    si, sj = rng.integers(0, n, args.scipy_pairs), rng.integers(0, n, args.scipy_pairs)
    ad, bd = a.astype(np.float64), b.astype(np.float64)
    start = time.perf_counter()
    _ = [1.0 - scipy_cosine(ad[p], bd[q]) for p, q in zip(si.tolist(), sj.tolist())]
    t_scipy = (time.perf_counter() - start) * pairs / args.scipy_pairs

    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(sorted({f"{p.get('internal_api')} {p.get('num_threads')} threads"
                                 for p in threadpool_info() if p.get("user_api") == "blas"}))
    except ImportError:
        blas = "unknown"
    print(f"two blocks of {n} x {args.dim} float32, {pairs:,} pairs, threshold {args.threshold} angular "
          f"(cosine {cos_t:.4f}), {len(reference)} pairs found; numpy {np.__version__}, BLAS {blas}, "
          f"kernel threads {threads}, cpu count {os.cpu_count()}" + (f", faiss {faiss_info}" if faiss_info else ""))
    rows = [
        ("bare float32 matmul a @ b.T", best["bare"]),
        ("bare matmul, kernel threading", best["bare_threaded"]),
        ("naive: nonzero(a @ b.T >= t)", best["naive"]),
        (f"kernel ({threads} threads)", best["kernel"]),
        ("kernel (1 thread)", best["kernel_1"]),
    ]
    if "faiss" in best:
        rows.append(("faiss IndexFlatIP.range_search", best["faiss"]))
    rows.append((f"scipy cosine loop (sample {args.scipy_pairs})", t_scipy))
    print(f"{'method':<40}{'seconds':>10}{'pairs/s':>14}{'vs bare':>10}{'kernel x':>10}")
    for name, t in rows:
        print(f"{name:<40}{t:>10.4f}{pairs / t:>14.3e}{best['bare'] / t:>10.2f}{t / best['kernel']:>10.1f}")
    results = {
        "block": n, "dim": args.dim, "pairs": pairs, "found": len(reference), "threshold": args.threshold,
        "threads": threads, "blas": blas, "faiss": faiss_info, "repeats": args.repeats,
        "methods": {name: {"seconds": t, "pairs_per_s": pairs / t, "rate_vs_bare": best["bare"] / t,
                           "kernel_speedup": t / best["kernel"]} for name, t in rows},
    }
    if args.results:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
