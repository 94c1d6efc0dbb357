"""Matching at catalogue scale through the match pipeline: exact and approximate, time and peak memory.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_matching_scale.py --items 1000000 --search exact \
        --results bench/results/scale_1m_exact.json

1. Writes (once, cached under --data_dir) a synthetic templates table of --items clustered 128-d unit
   vectors with planted near-duplicates (bench/synthetic.py), in 16 Parquet shards.
2. Bare baseline: `a @ b.T` (NumPy float32, default BLAS threads, nothing else) on --bare_samples random
   pairs of 8192-row blocks of these templates, before and after the pipeline run; the bare time of the
   whole job is n*(n-1)/2 pairs at that rate (every block product of one shape costs the same).
3. The pipeline: `python -m beam_pipeline.match --search exact|approximate` in a child process under
   /usr/bin/time -v (peak RSS of the whole run: staging, pipeline, writing), DirectRunner in-memory.
4. Results go to --results as JSON after every step, and are printed as they come.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import synthetic  # noqa: E402


def _save(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=None)[:2000], flush=True)


def bare_rate(glob: str, block: int, samples: int, seed: int) -> dict:
    """Pairs/s of the bare float32 product of two `block`-row blocks of the templates (median of samples)."""
    import pyarrow.parquet as pq

    from schemas.tables import embeddings_as_numpy

    paths = sorted(__import__("glob").glob(glob))
    parts, rows = [], 0
    for path in paths:  # enough shards for a few blocks
        parts.append(embeddings_as_numpy(pq.read_table(path, columns=["embedding"])))
        rows += len(parts[-1])
        if rows >= 6 * block:
            break
    x = np.concatenate(parts)
    nb = len(x) // block
    if nb < 2:
        raise ValueError("need at least two blocks of templates")
    rng = np.random.default_rng(seed)
    times, cpu = [], []
    for _ in range(samples):
        i, j = rng.choice(nb, 2, replace=False)
        a, b = np.ascontiguousarray(x[i * block:(i + 1) * block]), np.ascontiguousarray(x[j * block:(j + 1) * block])
        start, start_cpu = time.perf_counter(), time.process_time()
        a @ b.T
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    t = float(np.median(times))
    return {"block": block, "samples": samples, "median_s": t, "min_s": float(min(times)),
            "pairs_per_s": block * block / t, "median_cpu_s": float(np.median(cpu)),
            "pairs_per_cpu_s": block * block / float(np.median(cpu))}


def run_pipeline(glob: str, out: str, search: str, threshold: float, extra: list[str]) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "beam_pipeline.match", "--templates", glob, "--output", out,
           "--threshold", str(threshold), "--search", search, "--run_id", f"bench-{search}", *extra]
    print("running:", " ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"match failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    user = float(re.search(r"User time \(seconds\): ([0-9.]+)", proc.stderr).group(1))
    system = float(re.search(r"System time \(seconds\): ([0-9.]+)", proc.stderr).group(1))
    with open(os.path.join(out, "match_run.json")) as f:
        doc = json.load(f)
    return {"wall_s": wall, "cpu_s": user + system, "peak_rss_gib": rss_kb / 2 ** 20, "match_run": doc}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--search", default="exact", choices=["exact", "approximate", "both"])
    parser.add_argument("--threshold", type=float, default=0.9, help="angular similarity (default 0.9)")
    parser.add_argument("--block_size", type=int, default=8192)
    parser.add_argument("--bare_samples", type=int, default=24)
    parser.add_argument("--data_dir", default="/tmp/siamese-bench")
    parser.add_argument("--results", default=os.path.join(ROOT, "bench", "results", "scale.json"))
    parser.add_argument("--extra", default="", help="extra match flags, space separated")
    parser.add_argument("--skip_bare", action="store_true", help="no bare baseline (e.g. approximate only)")
    args = parser.parse_args(argv)

    results = {"items": args.items, "dim": args.dim, "threshold": args.threshold, "cpu_count": os.cpu_count(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data = os.path.join(args.data_dir, f"templates_{args.items}_{args.dim}")
    glob = os.path.join(data, "*.parquet")
    if not os.path.exists(os.path.join(data, "done")):
        start = time.perf_counter()
        synthetic.write_templates(data, args.items, args.dim, shards=16)
        open(os.path.join(data, "done"), "w").close()
        results["generate_s"] = time.perf_counter() - start
    pairs = args.items * (args.items - 1) // 2
    results["pairs_total"] = pairs
    if not args.skip_bare:
        results["bare_before"] = bare_rate(glob, args.block_size, args.bare_samples, 1)
    _save(args.results, results)
    searches = ["approximate", "exact"] if args.search == "both" else [args.search]
    for search in searches:
        out = os.path.join(args.data_dir, f"out_{args.items}_{search}")
        extra = ["--block_size", str(args.block_size), *args.extra.split()]
        results[search] = run_pipeline(glob, out, search, args.threshold, extra)
        _save(args.results, results)
    if not args.skip_bare:
        results["bare_after"] = bare_rate(glob, args.block_size, args.bare_samples, 2)
        rate = max(results["bare_before"]["pairs_per_s"], results["bare_after"]["pairs_per_s"])
        results["bare_total_s_at_best_rate"] = pairs / rate
        cpu_rate = max(results["bare_before"]["pairs_per_cpu_s"], results["bare_after"]["pairs_per_cpu_s"])
        results["bare_total_cpu_s_at_best_rate"] = pairs / cpu_rate
        for search in searches:
            results[search]["time_over_bare"] = results[search]["wall_s"] / results["bare_total_s_at_best_rate"]
            results[search]["cpu_over_bare"] = results[search]["cpu_s"] / results["bare_total_cpu_s_at_best_rate"]
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _save(args.results, results)
    return results


if __name__ == "__main__":
    main()
