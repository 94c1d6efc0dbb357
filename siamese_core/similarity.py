"""The one definition of similarity between embeddings, in NumPy.

Embeddings are L2-normalised float32 vectors, so cosine similarity is a dot product.
Angular similarity = 1 - arccos(cos) / pi lies in [0, 1]: identical 1, orthogonal 0.5, opposite 0.
It is monotonic in cosine, so a threshold in one converts exactly to the other; thresholds are stated in
angular similarity and compared in cosine (cheaper: no arccos per pair).
The trainer's evaluation and every pipeline import these functions.
"""
from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of `x` (n, d) scaled to unit length, float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


# A float32 dot product of a unit vector with itself lands up to a few ulps below 1, and arccos is steep
# there (arccos(1 - 6e-8) = 3.5e-4 rad): without snapping, identical images would score 0.99989.
# Angles that small cannot be resolved from float32 embeddings anyway.
_FLOAT32_COS_TOLERANCE = 4 * float(np.finfo(np.float32).eps)


def angular_similarity(cosine: np.ndarray | float) -> np.ndarray:
    """Angular similarity in [0, 1] from cosine similarity (any shape), float32.

    Cosines within float32 rounding of +1 or -1 count as exactly +1 or -1.
    """
    cos = np.clip(np.asarray(cosine, dtype=np.float64), -1.0, 1.0)
    cos = np.where(cos >= 1.0 - _FLOAT32_COS_TOLERANCE, 1.0, cos)
    cos = np.where(cos <= -1.0 + _FLOAT32_COS_TOLERANCE, -1.0, cos)
    return (1.0 - np.arccos(cos) / np.pi).astype(np.float32)


def cosine_from_angular(similarity: np.ndarray | float) -> np.ndarray:
    """Inverse of `angular_similarity`: the cosine at angular similarity `similarity` (in [0, 1])."""
    sim = np.asarray(similarity, dtype=np.float64)
    if np.any((sim < 0) | (sim > 1)):
        raise ValueError(f"angular similarity must lie in [0, 1], got {similarity}")
    return np.cos(np.pi * (1.0 - sim))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between matching rows of unit vectors `a` and `b` (n, d) -> (n,)."""
    return np.einsum("nd,nd->n", np.asarray(a, np.float32), np.asarray(b, np.float32))


def pair_angular_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angular similarity between matching rows of unit vectors `a` and `b` (n, d) -> (n,)."""
    return angular_similarity(cosine_similarity(a, b))


def upper_pair_blocks(embeddings: np.ndarray, block: int, b: np.ndarray | None = None, beta: float = 0.0):
    """Every unordered pair of distinct rows of unit `embeddings` (n, d) once, `block` rows at a time.

    Yields (start, scores (k, n - start) float32, upper bool (k, n - start)): scores[r, c] is the pair of
    rows start + r and start + c, angular similarity, kNN-normalised (`knn_normalised`) when each row's
    `b` (n,) is given; `upper` keeps c > r (each pair once, no row with itself). Memory: one block x n slab.
    """
    n = len(embeddings)
    for start in range(0, n, block):
        scores = angular_similarity(embeddings[start:start + block] @ embeddings[start:].T)
        if b is not None:
            scores = knn_normalised(scores, b[start:start + block, None], b[None, start:], beta)
        k = min(block, n - start)
        upper = np.ones(scores.shape, bool)
        upper[:, :k] = np.triu(np.ones((k, k), bool), 1)
        yield start, scores, upper


def all_pair_scores(embeddings: np.ndarray, labels: np.ndarray | None = None,
                    block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Angular similarity of every unordered pair of distinct rows (i < j), split by label.

    Returns (same_label_scores, different_label_scores); with labels=None every pair is "different"
    (first array empty). Memory: the scores themselves (n(n-1)/2 float32) plus one block x n slab.
    """
    emb = np.asarray(embeddings, np.float32)
    lab = None if labels is None else np.asarray(labels).reshape(-1)
    same_parts, diff_parts = [], []
    for start, scores, upper in upper_pair_blocks(emb, block):
        if lab is None:
            diff_parts.append(scores[upper])
            continue
        same = lab[start:start + block, None] == lab[None, start:]
        same_parts.append(scores[upper & same])
        diff_parts.append(scores[upper & ~same])
    empty = np.zeros(0, np.float32)
    return (np.concatenate(same_parts) if same_parts else empty,
            np.concatenate(diff_parts) if diff_parts else empty)


# --- score normalisation against each item's k-th neighbour (ISC2021) ------------------------------------
# On a catalogue the encoder never saw, dense regions (many similar landscapes) crowd distinct pairs up to
# where copies score, and sparse regions hold copies that score lower. Normalising each pair by how close
# its two items' k-th neighbours are lets one threshold serve both (BENCHMARKS.md "Copy detection": the
# general recipe's F1 at its own threshold 0.75 -> 0.91). k exceeds the size of a typical duplicate group,
# so an item's own copies do not set its b.
SCORE_NORMS = ("none", "knn")
KNN_K = 10
KNN_BETA = 0.5


def top_k_per_row(scores: np.ndarray, k: int) -> np.ndarray:
    """The k largest values of each row of `scores` (n, m), unordered (n, k); the k-th largest is their
    minimum. One partition per row (O(m)), not a sort."""
    return -np.partition(-scores, k - 1, axis=1)[:, :k]


def kth_neighbour_similarity(queries: np.ndarray, references: np.ndarray, k: int = KNN_K, *,
                             same_set: bool = False, block: int = 2048) -> np.ndarray:
    """b: the angular similarity of each query row (n, d) to its k-th most similar row of `references`
    (m, d), float32 (n,). With `same_set` (queries are references[0:n] in order) an item is not its own
    neighbour. Computed in blocks of `block` queries (memory O(block x m))."""
    queries, references = np.asarray(queries, np.float32), np.asarray(references, np.float32)
    available = len(references) - (1 if same_set else 0)
    if not 1 <= k <= available:
        raise ValueError(f"the k-th neighbour needs 1 <= k <= {available} other items, got k={k}")
    out = np.empty(len(queries), np.float32)
    for a in range(0, len(queries), block):
        cos = queries[a:a + block] @ references.T
        if same_set:
            rows = np.arange(len(cos))
            cos[rows, rows + a] = -np.inf
        out[a:a + block] = top_k_per_row(cos, k).min(axis=1)
    return angular_similarity(out)


def knn_normalised(angular: np.ndarray, b_left: np.ndarray, b_right: np.ndarray,
                   beta: float = KNN_BETA) -> np.ndarray:
    """The normalised score of pairs: angular - beta * (b_left + b_right) / 2 (arrays of one shape, or
    broadcastable: (n, 1) and (1, m) give a matrix), float32. Higher is more alike, as before; it is no
    longer an angular similarity (it can be negative), so thresholds on it are stated as scores."""
    return (np.asarray(angular, np.float32)
            - np.float32(beta) * (np.asarray(b_left, np.float32) + np.asarray(b_right, np.float32)) / 2
            ).astype(np.float32)
