"""beam_pipeline.match_stats: the matched pairs' combiner equals NumPy, merges in any split, and its memory
does not grow with the number of pairs (a million matched pairs)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from beam_pipeline import match_stats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _matches(n, seed=0, id_len=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5000, n)
    b = a + 1 + rng.integers(0, 200, n)
    pad = "x" * id_len
    return pa.table({"left_id": [f"{pad}{k:06d}" for k in a], "right_id": [f"{pad}{k:06d}" for k in b],
                     "score": rng.uniform(0.6, 1.0, n).astype(np.float32)})


def test_combiner_equals_numpy_in_any_split(tmp_path):
    table = _matches(5000)
    groups = {f"{k:06d}": k // 3 for k in range(6000)}
    fn = match_stats.MatchStatsFn("angular_similarity", weakest=7)
    batches = [match_stats._batch_arrays(b, groups) for b in table.to_batches(max_chunksize=700)]
    whole = fn.extract_output(fn.merge_accumulators([fn.add_input(fn.create_accumulator(), x) for x in batches]))
    halves = [fn.create_accumulator(), fn.create_accumulator()]
    for k, x in enumerate(batches):
        halves[k % 2] = fn.add_input(halves[k % 2], x)
    split = fn.extract_output(fn.merge_accumulators(halves))
    s = table.column("score").to_numpy()
    left, right = table.column("left_id").to_pylist(), table.column("right_id").to_pylist()
    genuine = np.array([groups[a] == groups[b] for a, b in zip(left, right)])
    edges = whole["edges"]
    want = np.bincount(np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2), minlength=len(edges) - 1)
    for out in (whole, split):
        np.testing.assert_array_equal(out["counts"], want)
        assert out["genuine_counts"].sum() == genuine.sum() and out["pairs"] == 5000
        assert out["low"] == s.min() and out["high"] == s.max()
        assert [w[0] for w in out["weakest"]] == sorted(s.astype(float))[:7]
    k = int(np.argmin(s))
    assert whole["weakest"][0][1:] == (left[k], right[k])


def test_pipeline_and_display_histogram(tmp_path):
    table = _matches(3000, seed=1)
    pq.write_table(table, tmp_path / "matches-00000-of-00001.parquet", row_group_size=500)
    stats = match_stats.compute(str(tmp_path / "matches-*.parquet"))
    assert stats["pairs"] == 3000 and stats["genuine_counts"].sum() == 0
    h = match_stats.display_histogram(stats, 0.6, 1.0, 20, "matched pairs")
    s = table.column("score").to_numpy()
    want, _ = np.histogram(s, bins=np.linspace(0.6, 1.0, 21))
    # Fine bins (1/4000 of the range) are assigned whole to a display bin: a pair within one fine bin of a
    # display edge may land on its other side.
    assert sum(h["counts"]) == 3000 and np.abs(np.cumsum(h["counts"]) - np.cumsum(want)).max() <= 0.01 * 3000


def test_memory_does_not_grow_with_a_million_pairs(tmp_path):
    """Peak memory of the combiner over 1,000,000 matched pairs (ids like bucket paths: the table itself
    would take ~100 MB in memory) exceeds that over 20,000 by far less than the table."""
    big, small = tmp_path / "big", tmp_path / "small"
    os.makedirs(big)
    os.makedirs(small)
    for d, n in ((big, 1_000_000), (small, 20_000)):
        t = _matches(n, seed=2, id_len=40)
        pq.write_table(t, d / "matches-00000-of-00001.parquet", row_group_size=65536)
    table_bytes = _matches(1_000_000, seed=2, id_len=40).nbytes
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {ROOT!r})
        from beam_pipeline import match_stats
        rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        small = match_stats.compute({str(small / '*.parquet')!r})
        base = rss()
        big = match_stats.compute({str(big / '*.parquet')!r})
        print(small["pairs"], big["pairs"], rss() - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    small_pairs, big_pairs, growth = map(int, out.stdout.split()[-3:])
    assert (small_pairs, big_pairs) == (20_000, 1_000_000)
    assert table_bytes > 90e6
    print(f"peak memory growth over 1M pairs: {growth / 1e6:.1f} MB (the table: {table_bytes / 1e6:.0f} MB)")
    assert growth < table_bytes / 3, f"peak memory grew by {growth / 1e6:.0f} MB over 1M pairs"
