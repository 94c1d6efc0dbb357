"""beam_pipeline.score_distribution: the histogram of all pairs, borderline pairs and the error curves
against brute force."""
import numpy as np
import pytest

from beam_pipeline import score_distribution as sd
from siamese_core.similarity import angular_similarity, kth_neighbour_similarity, knn_normalised, l2_normalize
from trainer.evaluate import rank_auc


def _catalogue(n=300, dim=16, groups=40, seed=0):
    """Unit rows with `groups` planted groups of 2-4 near copies; the group label of each row."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, dim))
    labels = np.arange(n)
    k = 0
    for g in range(groups):
        size = 2 + g % 3
        emb[k + 1:k + size] = emb[k] + rng.normal(scale=0.35, size=(size - 1, dim))
        labels[k:k + size] = k
        k += size
    return l2_normalize(emb).astype(np.float32), labels


def _brute(emb, labels, b=None, beta=0.0):
    i, j = np.triu_indices(len(emb), 1)
    s = angular_similarity(np.einsum("kd,kd->k", emb[i], emb[j]))
    if b is not None:
        s = knn_normalised(s, b[i], b[j], beta)
    return s, labels[i] == labels[j], i, j


@pytest.mark.parametrize("knn", [False, True])
def test_histogram_and_borderline_equal_brute_force(knn):
    emb, labels = _catalogue()
    b = kth_neighbour_similarity(emb, emb, 10, same_set=True) if knn else None
    score = "knn_normalised" if knn else "angular_similarity"
    s, same, i, j = _brute(emb, labels, b, 0.5)
    threshold = float(np.quantile(s, 0.99))
    dist = sd.pair_score_distribution(emb, threshold, score=score, b=b, beta=0.5, groups=labels, block=64,
                                      borderline=10)
    edges = dist.edges
    want_imp = np.bincount(sd._bin(s[~same], edges), minlength=len(edges) - 1)
    want_gen = np.bincount(sd._bin(s[same], edges), minlength=len(edges) - 1)
    # Equal up to float round-off moving a score that sits on a bin edge into the next bin.
    for got, want in ((dist.impostor, want_imp), (dist.genuine, want_gen)):
        assert got.sum() == want.sum()
        assert np.abs(np.cumsum(got) - np.cumsum(want)).max() <= 2
    assert dist.exhaustive and dist.scale == 1.0
    below = np.sort(s[s < np.float32(threshold)])[::-1][:10]
    np.testing.assert_allclose([v for _, _, v in dist.borderline], below, rtol=0, atol=1e-6)
    for a, c, v in dist.borderline:
        assert a < c and v < threshold


def test_subset_scales_impostors_and_scores_every_genuine_pair():
    emb, labels = _catalogue(n=400)
    s, same, _, _ = _brute(emb, labels)
    dist = sd.pair_score_distribution(emb, 0.9, groups=labels, max_items=200, seed=3)
    assert not dist.exhaustive and dist.items_scored == 200
    assert dist.scale == pytest.approx(400 * 399 / (200 * 199))
    assert dist.genuine.sum() == same.sum()  # the truth's pairs are all scored
    assert dist.impostor.sum() == 200 * 199 // 2 - _within_pairs(labels, dist)
    # The estimate of impostor pairs over the whole catalogue is the right size.
    assert dist.impostor.sum() * dist.scale == pytest.approx((~same).sum(), rel=0.02)


def _within_pairs(labels, dist):
    rows = np.sort(np.random.default_rng(3).choice(len(labels), dist.items_scored, replace=False))
    _, counts = np.unique(labels[rows], return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def test_curves_match_brute_force_rates():
    emb, labels = _catalogue(n=600, groups=80)
    s, same, _, _ = _brute(emb, labels)
    dist = sd.pair_score_distribution(emb, 0.95, groups=labels)
    c = sd.curves(dist, targets=(1e-2, 1e-3, 1e-6))
    assert c["genuine_pairs"] == same.sum() and c["impostor_pairs"] == (~same).sum()
    # AUC within one bin's ties of the exact rank AUC.
    assert c["auc"] == pytest.approx(rank_auc(s[same], s[~same]), abs=2e-3)
    for row in c["at_fmr"][:2]:
        assert row["reached"]
        t = row["threshold"]
        assert np.mean(s[~same] >= t) <= row["target_fmr"]
        assert row["false_matches"] == (s[~same] >= t).sum()
        assert row["fmr_95"][0] <= row["fmr"] <= row["fmr_95"][1]
        # One bin lower would break the target: the threshold is the lowest on the grid that holds.
        assert np.mean(s[~same] >= t - c["resolution"]) > row["target_fmr"] or \
            (s[~same] >= t - c["resolution"]).sum() == row["false_matches"]
        assert row["tmr"] == pytest.approx(np.mean(s[same] >= t))
    assert not c["at_fmr"][2]["reached"] and "rule of three" in c["at_fmr"][2]["why"]
    eer_t = c["eer"]["threshold"]
    assert abs(np.mean(s[~same] >= eer_t) - np.mean(s[same] < eer_t)) < 0.05
    for p in c["points"]:
        if p["precision"] is not None:
            tp, fp = (s[same] >= p["threshold"]).sum(), (s[~same] >= p["threshold"]).sum()
            assert p["precision"] == pytest.approx(tp / (tp + fp), rel=1e-3)  # a score on a bin edge may round either way


def test_curves_refuse_without_genuine_pairs():
    emb, _ = _catalogue(n=50, groups=0)
    with pytest.raises(ValueError, match="genuine"):
        sd.curves(sd.pair_score_distribution(emb, 0.9))


def test_predicted_pairs_counts_pairs_at_or_above():
    emb, labels = _catalogue()
    s, _, _, _ = _brute(emb, labels)
    dist = sd.pair_score_distribution(emb, 0.9, groups=labels)
    for t in (0.6, 0.8, 0.9):
        edge = dist.edges[np.searchsorted(dist.edges, t)]
        assert sd.predicted_pairs(dist, np.array([t]))[0] == (s >= edge).sum()
