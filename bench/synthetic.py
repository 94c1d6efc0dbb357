"""Synthetic templates for the matching benchmarks: clustered unit vectors with planted near-duplicates.

Random unit vectors in 128 dimensions have no pairs above a dedup threshold, so the catalogue is built
like a real one: items scattered around `clusters` centres (same-cluster cosine ~0.4: structure for the
k-means partitions, no matches), and a fraction of them with 1-3 planted near-copies whose cosine to
their original spreads from ~0.95 to ~0.999 (copies of one original are a little less alike; some
pairs straddle a 0.9 angular threshold = cosine 0.951).
Deterministic for a seed; generated chunk by chunk, so 1,000,000 x 128 never sits in memory twice.
"""
from __future__ import annotations

import datetime
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def catalogue_chunks(n: int, dim: int = 128, *, seed: int = 0, clusters: int = 1000, spread: float = 0.1,
                     planted_fraction: float = 0.1, chunk: int = 65_536):
    """Yield float32 unit chunks (rows, dim) summing to n rows: originals followed by their planted copies."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, dim)))
    made = 0
    while made < n:
        rows = min(chunk, n - made)
        originals = max(1, int(round(rows / (1 + 2 * planted_fraction))))
        x = _unit(centres[rng.integers(0, clusters, originals)]
                  + spread * rng.standard_normal((originals, dim)).astype(np.float32))
        parents = rng.choice(originals, size=int(originals * planted_fraction), replace=False)
        copies = rng.integers(1, 4, len(parents))
        src = np.repeat(parents, copies)[: rows - originals]
        eps = rng.uniform(0.004, 0.03, (len(src), 1)).astype(np.float32)
        dup = _unit(x[src] + eps * rng.standard_normal((len(src), dim)).astype(np.float32))
        out = np.concatenate([x, dup])[:rows]
        if len(out) < rows:  # too few copies drawn: top up with fresh originals
            extra = _unit(centres[rng.integers(0, clusters, rows - len(out))]
                          + spread * rng.standard_normal((rows - len(out), dim)).astype(np.float32))
            out = np.concatenate([out, extra])
        made += rows
        yield out


def catalogue(n: int, dim: int = 128, **kwargs) -> np.ndarray:
    """The whole synthetic catalogue (n, dim) float32 (for sizes that fit in memory)."""
    return np.concatenate(list(catalogue_chunks(n, dim, **kwargs))) if n else np.zeros((0, dim), np.float32)


def write_templates(directory: str, n: int, dim: int = 128, *, shards: int = 16, model_id: str = "0123456789abcdef",
                    seed: int = 0, **kwargs) -> str:
    """Write the synthetic catalogue as a templates table (schemas.templates_schema) in `shards` files;
    returns the glob. Item ids are 'item_00000000'... in row order."""
    from schemas.tables import templates_schema

    os.makedirs(directory, exist_ok=True)
    per_shard = -(-n // shards)
    schema = templates_schema(dim)
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    row = 0
    shard, writer = 0, None
    for chunk in catalogue_chunks(n, dim, seed=seed, chunk=per_shard, **kwargs):
        k = len(chunk)
        ids = [f"item_{row + r:08d}" for r in range(k)]
        table = pa.table({
            "item_id": ids, "source_uri": [f"/synthetic/{i}" for i in ids], "content_sha256": ["0" * 64] * k,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1), pa.float32()), dim),
            "model_id": [model_id] * k, "width": pa.array([28] * k, pa.int32()),
            "height": pa.array([28] * k, pa.int32()), "embedded_at": pa.array([now] * k, pa.timestamp("us", tz="UTC")),
            "run_id": ["synthetic"] * k,
        }, schema=schema)
        pq.write_table(table, os.path.join(directory, f"templates-{shard:05d}-of-{shards:05d}.parquet"))
        shard += 1
        row += k
    return os.path.join(directory, "*.parquet")
