import numpy as np
import pytest

from siamese_core.similarity import (
    angular_similarity,
    cosine_from_angular,
    l2_normalize,
    pair_angular_similarity,
)


def test_identical_opposite_orthogonal():
    a = l2_normalize(np.array([[1.0, 2.0, 3.0]]))
    assert pair_angular_similarity(a, a)[0] == pytest.approx(1.0, abs=1e-6)
    assert pair_angular_similarity(a, -a)[0] == pytest.approx(0.0, abs=1e-6)
    b = l2_normalize(np.array([[3.0, 0.0, -1.0]]))  # a . b = 0
    assert pair_angular_similarity(a, b)[0] == pytest.approx(0.5, abs=1e-6)


def test_sixty_degrees_and_clipping():
    assert angular_similarity(0.5) == pytest.approx(1 - 1 / 3, abs=1e-6)
    # float error can push a dot product of unit vectors past 1: clipped, not NaN
    assert angular_similarity(np.float32(1.0000001)) == pytest.approx(1.0)
    assert angular_similarity(-1.0000001) == pytest.approx(0.0)


def test_cosine_from_angular_inverts():
    sims = np.linspace(0, 1, 11)
    np.testing.assert_allclose(angular_similarity(cosine_from_angular(sims)), sims, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cosine_from_angular(1.2)


def test_l2_normalize_zero_vector_stays_finite():
    out = l2_normalize(np.zeros((1, 4)))
    assert np.isfinite(out).all()


def test_float32_self_similarity_is_exactly_one():
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(1000, 64)))
    np.testing.assert_array_equal(pair_angular_similarity(x, x), np.ones(1000, np.float32))
    np.testing.assert_array_equal(pair_angular_similarity(x, -x), np.zeros(1000, np.float32))
    # the tolerance is float32 rounding (about 1e-3 rad): a few milliradians apart still score below 1
    y = l2_normalize(x + 3e-3 * l2_normalize(rng.normal(size=(1000, 64))))
    assert (pair_angular_similarity(x, y) < 1).all()


def test_kth_neighbour_similarity_equals_brute_force():
    from siamese_core.similarity import kth_neighbour_similarity
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = angular_similarity(x @ x.T).astype(np.float64)
    others = sims.copy()
    np.fill_diagonal(others, -np.inf)
    for k in (1, 3, 10):
        expected = np.sort(others, axis=1)[:, ::-1][:, k - 1]
        np.testing.assert_allclose(kth_neighbour_similarity(x, x, k, same_set=True, block=5), expected, atol=1e-6)
        # Queries that are not in the set: an item's own row counts (it is then its own nearest neighbour).
        np.testing.assert_allclose(kth_neighbour_similarity(x[:4], x, k, block=3),
                                   np.sort(sims[:4], axis=1)[:, ::-1][:, k - 1], atol=1e-6)
    with pytest.raises(ValueError, match="1 <= k <= 36"):
        kth_neighbour_similarity(x, x, 37, same_set=True)


def test_knn_normalised_pulls_dense_items_down():
    from siamese_core.similarity import knn_normalised
    # Two pairs of equal similarity: the one whose items sit in a dense region (high b) scores lower.
    scores = knn_normalised(np.array([0.9, 0.9]), np.array([0.85, 0.6]), np.array([0.85, 0.6]), beta=0.5)
    np.testing.assert_allclose(scores, [0.9 - 0.425, 0.9 - 0.3], atol=1e-6)
    matrix = knn_normalised(np.full((2, 3), 0.8), np.array([[0.2], [0.4]]), np.array([[0.0, 0.2, 0.4]]), 1.0)
    np.testing.assert_allclose(matrix, [[0.7, 0.6, 0.5], [0.6, 0.5, 0.4]], atol=1e-6)
