"""The blocked all-pairs kernel against a brute-force NumPy reference."""
import numpy as np
import pytest

from beam_pipeline import matching
from siamese_core.similarity import l2_normalize


def _unit(n, d, seed):
    rng = np.random.default_rng(seed)
    return l2_normalize(rng.standard_normal((n, d)))


def _gap_threshold(sims64, lo=0.05, hi=0.6):
    """A threshold far (> 1e-4) from every similarity, so float32 rounding cannot flip any pair."""
    values = np.sort(np.unique(sims64[(sims64 > lo) & (sims64 < hi)]))
    gaps = np.diff(values)
    k = int(np.argmax(gaps))
    assert gaps[k] > 2e-4
    return float((values[k] + values[k + 1]) / 2)


def _reference(left, right, thr, same_block):
    full = left.astype(np.float64) @ right.astype(np.float64).T
    i, j = np.nonzero(full >= thr)
    if same_block:
        keep = j > i
        i, j = i[keep], j[keep]
    return set(zip(i.tolist(), j.tolist())), full


def test_block_pairs_cover_every_pair_once():
    assert matching.block_pairs(0, 4) == []
    assert matching.block_pairs(4, 4) == [(0, 0)]
    assert matching.block_pairs(5, 4) == [(0, 0), (0, 1), (1, 1)]
    assert matching.block_pairs(9, 3) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    n, bs = 11, 4
    seen = []
    for bi, bj in matching.block_pairs(n, bs):
        a0, a1 = matching.block_bounds(bi, n, bs)
        b0, b1 = matching.block_bounds(bj, n, bs)
        seen += [(i, j) for i in range(a0, a1) for j in range(b0, b1) if i < j]
    assert sorted(seen) == [(i, j) for i in range(n) for j in range(i + 1, n)]
    with pytest.raises(ValueError):
        matching.block_pairs(3, 0)


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 64])
def test_same_block_exact_set(chunk_rows):
    x = _unit(150, 8, 0)
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    thr = _gap_threshold(sims[np.triu_indices(150, 1)])
    expected, full = _reference(x, x, thr, True)
    assert 50 < len(expected) < 150 * 149 // 2  # a meaningful threshold
    i, j, cos = matching.pairs_above_threshold(x, x, thr, same_block=True, chunk_rows=chunk_rows)
    assert i.dtype == np.int64 and j.dtype == np.int64 and cos.dtype == np.float32
    assert set(zip(i.tolist(), j.tolist())) == expected
    assert len(i) == len(expected)  # no pair twice
    assert (i < j).all()
    np.testing.assert_allclose(cos, full[i, j], atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [None, 5, 40])
def test_cross_block_exact_set(chunk_rows):
    left, right = _unit(40, 6, 1), _unit(33, 6, 2)
    thr = _gap_threshold((left.astype(np.float64) @ right.astype(np.float64).T).ravel())
    expected, full = _reference(left, right, thr, False)
    i, j, cos = matching.pairs_above_threshold(left, right, thr, same_block=False, chunk_rows=chunk_rows)
    assert set(zip(i.tolist(), j.tolist())) == expected and len(i) == len(expected)
    np.testing.assert_allclose(cos, full[i, j], atol=1e-6)


def test_blocked_matching_equals_brute_force_at_block_boundaries():
    # 23 rows in blocks of 5: the last block is short; near-copies straddle block boundaries.
    base = _unit(23, 4, 3)
    base[5] = l2_normalize(base[4] + 0.01)  # pair (4, 5) crosses blocks 0|1
    base[20] = l2_normalize(base[19] + 0.01)  # crosses 3|4
    base[22] = l2_normalize(base[0] + 0.01)  # first and last row
    base = l2_normalize(base)
    sims = base.astype(np.float64) @ base.astype(np.float64).T
    thr = _gap_threshold(sims[np.triu_indices(23, 1)], lo=0.3, hi=0.99)
    expected, _ = _reference(base, base, thr, True)
    assert {(4, 5), (19, 20), (0, 22)} <= expected
    found = []
    for bi, bj in matching.block_pairs(23, 5):
        i, j, _ = matching.match_block_pair(base, bi, bj, 5, thr)
        assert (i < j).all()
        found += list(zip(i.tolist(), j.tolist()))
    assert len(found) == len(set(found))
    assert set(found) == expected


def test_ties_at_the_threshold_are_kept():
    # Products of these components are exact in float32, so the cosines equal the threshold exactly.
    x = np.zeros((4, 3), np.float32)
    x[0] = [1, 0, 0]
    x[1] = [0.6, 0.8, 0]  # cos(0, 1) = float32(0.6) exactly
    x[2] = [0.6, 0, 0.8]  # cos(0, 2) = float32(0.6), cos(1, 2) = 0.36
    x[3] = [0, 0, 1]  # cos(2, 3) = 0.8, cos(0, 3) = 0
    t = float(np.float32(0.6))
    i, j, cos = matching.pairs_above_threshold(x, x, t, same_block=True)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (2, 3)]
    assert cos.tolist() == [np.float32(0.6), np.float32(0.6), np.float32(0.8)]
    # Just above the tie (the next float64): the tied pairs drop out, the float32 cast must not round down.
    above = np.nextafter(t, 1.0)
    i, j, _ = matching.pairs_above_threshold(x, x, above, same_block=True)
    assert list(zip(i.tolist(), j.tolist())) == [(2, 3)]


def test_identical_vectors_match_but_never_with_themselves():
    x = np.tile(np.array([[0.0, 1.0]], np.float32), (3, 1))
    i, j, cos = matching.pairs_above_threshold(x, x, 0.999, same_block=True, chunk_rows=2)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 2)]
    assert np.all(cos == 1.0)


def test_empty_inputs():
    x = np.zeros((0, 4), np.float32)
    i, j, cos = matching.pairs_above_threshold(x, x, 0.5, same_block=True)
    assert i.shape == j.shape == cos.shape == (0,)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.array([[np.nan, 0.0]], np.float32), "NaN"),
        (np.array([[2.0, 0.0]], np.float32), "norm 2.000000"),
        (np.array([[1.0, 0.0]], np.float64), "float32"),
        (np.array([1.0, 0.0], np.float32), "2-D"),
    ],
)
def test_refuses_bad_embeddings(bad, message):
    ok = np.array([[1.0, 0.0]], np.float32)
    with pytest.raises(ValueError, match=message):
        matching.pairs_above_threshold(bad, ok, 0.5, same_block=False)


def test_refuses_mixed_dimensions():
    with pytest.raises(ValueError, match="dimension 2 but right has 3"):
        matching.pairs_above_threshold(_unit(2, 2, 0), _unit(2, 3, 0), 0.5, same_block=False)


def test_check_catalogue_refusals():
    x = _unit(3, 4, 0)
    assert matching.check_catalogue(["a", "b", "c"], x, ["m1"] * 3) == "m1"
    with pytest.raises(ValueError, match="2 different models"):
        matching.check_catalogue(["a", "b", "c"], x, ["m1", "m2", "m1"])
    with pytest.raises(ValueError, match="duplicate item_id 'b'"):
        matching.check_catalogue(["a", "b", "b"], x, ["m1"] * 3)
    x[1, 0] = np.nan
    with pytest.raises(ValueError, match="row 1 has NaN"):
        matching.check_catalogue(["a", "b", "c"], x, ["m1"] * 3)


def test_float32_threshold_never_rounds_down():
    for t in [0.6, 0.1, 0.3333333333, 0.99999999]:
        t32 = matching.float32_threshold(t)
        assert float(t32) >= t
        assert float(np.nextafter(t32, np.float32(-1))) < t


def test_orient_pairs():
    lo, hi, swapped = matching.orient_pairs(["b", "a"], ["a", "c"])
    assert lo == ["a", "a"] and hi == ["b", "c"] and swapped.tolist() == [True, False]
    with pytest.raises(ValueError, match="itself"):
        matching.orient_pairs(["a"], ["a"])


@pytest.mark.parametrize("threads, chunk_rows", [(2, None), (3, 7), (2, 1)])
def test_threads_and_tiles_give_the_same_exact_set(threads, chunk_rows, monkeypatch):
    # Narrow tiles (5 columns) so rows span several column tiles and the diagonal cuts through tiles.
    monkeypatch.setattr(matching, "TILE_COLS", 5)
    x = _unit(150, 8, 4)
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    thr = _gap_threshold(sims[np.triu_indices(150, 1)])
    expected, full = _reference(x, x, thr, True)
    i, j, cos = matching.pairs_above_threshold(x, x, thr, same_block=True, chunk_rows=chunk_rows, threads=threads)
    assert list(zip(i.tolist(), j.tolist())) == sorted(expected)  # sorted by (i, j), each once
    np.testing.assert_allclose(cos, full[i, j], atol=1e-6)
    left, right = x[:40], x[60:133]
    expected, _ = _reference(left, right, thr, False)
    i, j, _ = matching.pairs_above_threshold(left, right, thr, same_block=False, chunk_rows=chunk_rows,
                                             threads=threads)
    assert list(zip(i.tolist(), j.tolist())) == sorted(expected)


def test_top_k_per_row_and_pair_cosines():
    i = np.array([2, 0, 0, 2, 0, 1])
    j = np.array([5, 3, 4, 6, 9, 7])
    cos = np.float32([0.9, 0.8, 0.95, 0.9, 0.8, 0.7])
    ti, tj, tc = matching.top_k_per_row(i, j, cos, 2)
    # row 0: 4 (0.95), then 3 and 9 tie at 0.8: smaller j first; row 2: 5 and 6 tie.
    assert list(zip(ti.tolist(), tj.tolist())) == [(0, 4), (0, 3), (1, 7), (2, 5), (2, 6)]
    assert tc.tolist() == [np.float32(0.95), np.float32(0.8), np.float32(0.7), np.float32(0.9), np.float32(0.9)]
    assert len(matching.top_k_per_row(i, j, cos, 0)[0]) == 6
    a = np.float32([[1, 0], [0.6, 0.8]])
    b = np.float32([[0.6, 0.8], [0.6, 0.8]])
    assert matching.pair_cosines(a, b).tolist() == [np.float32(0.6), np.float32(1.0)]
