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
