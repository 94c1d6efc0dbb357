"""The approximate candidate stage: k-means, multi-assignment with its exactness margin, per-partition
pairs reported once, and the recall estimate."""
import numpy as np
import pytest

from beam_pipeline import candidates
from siamese_core.similarity import l2_normalize


def _data(n=600, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = l2_normalize(rng.standard_normal((6, d)))[rng.integers(0, 6, n)] + 0.4 * rng.standard_normal((n, d))
    x = l2_normalize(x)
    x[1::3] = l2_normalize(x[0::3][: len(x[1::3])] + 0.05 * rng.standard_normal((len(x[1::3]), d)))
    return x.astype(np.float32)


def _exact(x, cos_t):
    s = x.astype(np.float64) @ x.astype(np.float64).T
    i, j = np.nonzero(np.triu(s >= cos_t, 1))
    return set(zip(i.tolist(), j.tolist()))


def _approx(x, centroids, cos_t, max_assign):
    assign, capped, _ = candidates.assign_partitions(x, centroids, cos_t, max_assign)
    found = []
    for p in range(len(centroids)):
        members = np.flatnonzero((assign == p).any(axis=1))
        gi, gj, _, _ = candidates.partition_pairs(p, members, x[members], assign[members], cos_t)
        found += [(min(a, b), max(a, b)) for a, b in zip(gi.tolist(), gj.tolist())]
    return found, capped


def test_kmeans_is_deterministic_and_unit():
    x = _data()
    c1 = candidates.spherical_kmeans(x, 5, iters=5, seed=3)
    c2 = candidates.spherical_kmeans(x, 5, iters=5, seed=3)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_allclose(np.linalg.norm(c1, axis=1), 1.0, atol=1e-5)
    assert candidates.spherical_kmeans(x[:3], 10).shape == (3, 8)
    assert candidates.default_partitions(5000) == 3 and candidates.default_partitions(0) == 1


def test_uncapped_margin_finds_every_pair_exactly_once():
    x = _data()
    cos_t = 0.9
    c = candidates.spherical_kmeans(x, 6, seed=0)
    found, capped = _approx(x, c, cos_t, max_assign=6)
    assert not capped.any()
    assert len(found) == len(set(found))  # each pair from one partition only
    assert set(found) == _exact(x, cos_t)


def test_capped_assignment_loses_pairs_and_says_so():
    x = _data()
    cos_t = 0.9
    c = candidates.spherical_kmeans(x, 6, seed=0)
    found, capped = _approx(x, c, cos_t, max_assign=1)
    exact = _exact(x, cos_t)
    assert capped.any()
    assert set(found) < exact and len(found) == len(set(found))


def test_assignments_are_ordered_and_padded():
    c = np.eye(3, dtype=np.float32)
    x = l2_normalize(np.float32([[1, 0.1, 0], [0, 0, 1]]))
    assign, capped, best = candidates.assign_partitions(x, c, cos_threshold=0.999, max_assign=3)
    # A tight threshold: the margin (2 x 2.6 degrees) holds only the home partition.
    assert assign.tolist() == [[0, -1, -1], [2, -1, -1]] and not capped.any()
    assign, capped, _ = candidates.assign_partitions(x, c, cos_threshold=0.0, max_assign=2)
    # A threshold of 90 degrees: every partition is within the margin; capped at 2, nearest first.
    assert assign[0].tolist() == [0, 1] and capped.all()
    np.testing.assert_allclose(best, [x[0, 0], 1.0], atol=1e-6)


def test_recall_estimate():
    r = candidates.recall_estimate(99, 100)
    assert r["recall"] == 0.99 and r["found"] == 99 and r["pairs"] == 100
    assert 0.94 < r["recall_lower_95"] < 0.99
    assert candidates.recall_estimate(100, 100)["recall_lower_95"] == pytest.approx(0.05 ** (1 / 100))
    assert candidates.recall_estimate(0, 0)["recall"] is None
