"""kNN score normalisation over a staged catalogue, against brute force on the whole matrix."""
import numpy as np
import pytest

from beam_pipeline import blocks as bk
from beam_pipeline import knn_norm
from tests.beam_pipeline.test_match import write_templates
from siamese_core.similarity import angular_similarity, knn_normalised


def _staged(tmp_path, n=23, d=6, block_size=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_templates(str(tmp_path / "t" / "templates-00000-of-00001.parquet"),
                    {f"i{k:03d}": x[k] for k in range(n)})
    manifest = bk.stage_templates(str(tmp_path / "t" / "*.parquet"), str(tmp_path / "blocks"), block_size)
    _, emb = bk.read_rows(manifest, np.arange(n))  # staged row order
    return manifest, emb


def _brute_b(emb, k):
    sims = angular_similarity(emb @ emb.T).astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    return np.sort(sims, axis=1)[:, ::-1][:, k - 1]


def test_catalogue_b_over_blocks_equals_brute_force(tmp_path):
    manifest, emb = _staged(tmp_path)
    assert manifest.num_blocks == 5
    for k in (1, 4, 10):
        np.testing.assert_allclose(knn_norm.catalogue_b(manifest, k), _brute_b(emb, k), atol=1e-6)
    scores = knn_norm.KnnScores(4, 0.5, knn_norm.catalogue_b(manifest, 4), manifest)
    outsider = emb[:3] * -1.0  # not catalogue items: every catalogue row is a candidate neighbour
    sims = angular_similarity(outsider @ emb.T).astype(np.float64)
    np.testing.assert_allclose(scores.b_of(outsider), np.sort(sims, axis=1)[:, ::-1][:, 3], atol=1e-6)
    with pytest.raises(ValueError, match="more than k=23 items"):
        knn_norm.catalogue_b(manifest, 23)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_pairs_above_score_equals_brute_force(tmp_path, beta):
    manifest, emb = _staged(tmp_path, n=40, block_size=16, seed=1)
    b = knn_norm.catalogue_b(manifest, 5)
    full = knn_normalised(angular_similarity(emb @ emb.T), b[:, None], b[None, :], beta)
    iu, ju = np.triu_indices(len(emb), 1)
    threshold = float(np.quantile(full[iu, ju], 0.9))
    expected = {(int(i), int(j)) for i, j in zip(iu, ju) if full[i, j] >= threshold}
    found = set()
    for bi in range(manifest.num_blocks):
        for bj in range(bi, manifest.num_blocks):
            a0, b0 = bi * 16, bj * 16
            left, right = emb[a0:a0 + 16], emb[b0:b0 + 16]
            i, j, cos, score = knn_norm.pairs_above_score(left, right, b[a0:a0 + 16], b[b0:b0 + 16], threshold,
                                                          beta, same_block=bi == bj)
            np.testing.assert_allclose(score, full[i + a0, j + b0], atol=1e-5)
            found |= {(int(x + a0), int(y + b0)) for x, y in zip(i, j)}
    assert found == expected and len(found) > 10
