"""kNN score normalisation over a staged catalogue (siamese_core.similarity.knn_normalised, ISC2021).

A pair's score is its angular similarity less beta times the mean of its two items' b, b being an item's
angular similarity to its k-th nearest other item of the catalogue. The match stage computes b for every
staged row once (`catalogue_b`), cuts the threshold on the normalised score (`pairs_above_score`), and
self-calibration scores its synthetic copies the same way (`KnnScores.b_of`: a copy's k-th neighbour among
the catalogue's items).

b is computed in the driver, block by block over the staged blocks: n^2 d multiply-adds, the work of one
exact all-pairs match on one machine (2.0 s for 10,748 items of dimension 64 on 2 cores; it grows as n^2).
numpy in, numpy out; blocks are read with beam_pipeline.blocks.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from beam_pipeline import blocks as bk
from beam_pipeline import matching
from siamese_core.similarity import angular_similarity, cosine_from_angular, knn_normalised, top_k_per_row

# Above this many items, b in the driver would take too long: a card's default falls back to plain angular
# similarity (stated in match_run.json); an explicit --score_norm knn is refused.
MAX_ITEMS = 200_000


@dataclasses.dataclass
class KnnScores:
    """The normalisation of one catalogue: k, beta, b of every staged row (n,), and the manifest to score
    new embeddings (synthetic copies) against."""

    k: int
    beta: float
    b: np.ndarray
    manifest: bk.Manifest

    def b_of(self, embeddings: np.ndarray) -> np.ndarray:
        """b of embeddings that are not catalogue items (m, d) -> (m,): their k-th neighbour in the catalogue."""
        return _kth_over_blocks(self.manifest, np.asarray(embeddings, np.float32), self.k, None)

    def to_json(self) -> dict:
        return {"k": self.k, "beta": self.beta, "b_median": float(np.median(self.b)) if len(self.b) else None,
                "b_range": [float(self.b.min()), float(self.b.max())] if len(self.b) else None}


def _kth_over_blocks(manifest: bk.Manifest, queries: np.ndarray, k: int, first_row: int | None) -> np.ndarray:
    """Angular similarity of each query row to its k-th most similar catalogue row. `first_row`: the queries
    are catalogue rows first_row.. (each is not its own neighbour); None: they are not catalogue items."""
    best = np.full((len(queries), k), -np.inf, np.float32)
    rows = np.arange(len(queries))
    for block in range(manifest.num_blocks):
        _, emb = bk.read_block(manifest, block)
        cos = queries @ emb.T
        if first_row is not None:
            start = block * manifest.block_size
            own = rows + first_row - start
            inside = (own >= 0) & (own < len(emb))
            cos[rows[inside], own[inside]] = -np.inf
        merged = np.concatenate([best, cos], axis=1)
        best = top_k_per_row(merged, k)
    return angular_similarity(best.min(axis=1))


def catalogue_b(manifest: bk.Manifest, k: int) -> np.ndarray:
    """b of every staged row, in row order (n,) float32. Raises ValueError when the catalogue has k items or
    fewer (no k-th other item)."""
    if manifest.n <= k:
        raise ValueError(f"kNN score normalisation needs more than k={k} items; the catalogue has {manifest.n}. "
                         "Pass --score_norm none")
    parts = []
    for block in range(manifest.num_blocks):
        _, emb = bk.read_block(manifest, block)
        parts.append(_kth_over_blocks(manifest, np.asarray(emb, np.float32), k, block * manifest.block_size))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def pairs_above_score(left: np.ndarray, right: np.ndarray, b_left: np.ndarray, b_right: np.ndarray,
                      threshold: float, beta: float, *, same_block: bool, threads: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j) of rows of `left` and `right` whose normalised score is >= `threshold`: (i, j, cos, score).

    The kernel first keeps pairs whose angular similarity reaches threshold + beta * (min b_left + min
    b_right) / 2, the lowest any pair of these blocks could need; then each pair's own score decides."""
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.float32))
    if not len(left) or not len(right):
        return empty
    floor = threshold + beta * (float(b_left.min()) + float(b_right.min())) / 2
    if floor > 1.0:
        return empty
    i, j, cos = matching.pairs_above_threshold(left, right, float(cosine_from_angular(max(floor, 0.0))),
                                               same_block=same_block, threads=threads, check=False)
    score = knn_normalised(angular_similarity(cos), b_left[i], b_right[j], beta)
    keep = score >= np.float32(threshold)
    return i[keep], j[keep], cos[keep], score[keep]
