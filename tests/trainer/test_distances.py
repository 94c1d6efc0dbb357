import numpy as np
import pytest

from trainer.distances import (
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
