"""Evaluation: exact values on hand-made scores and embeddings (no TensorFlow)."""
import os
import sys

import jsonschema
import numpy as np
import pytest

from schemas.documents import THRESHOLD_SCHEMA
from trainer import evaluate as E
from siamese_core.error_rates import rate_upper_bound
from siamese_core.similarity import all_pair_scores, angular_similarity, l2_normalize


def test_evaluate_does_not_import_tensorflow():
    import ast, inspect
    tree = ast.parse(inspect.getsource(E))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"tensorflow", "keras"}


def test_fmr_fnmr_exact():
    genuine = np.array([0.9, 0.8, 0.7, 0.6])
    impostor = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    fmr, fnmr = E.fmr_fnmr(genuine, impostor, [0.7, 0.75, 0.95])
    np.testing.assert_allclose(fmr, [2 / 5, 1 / 5, 0.0])      # impostor >= t
    np.testing.assert_allclose(fnmr, [1 / 4, 2 / 4, 4 / 4])   # genuine < t


def test_thresholds_at_fmr_exact_and_rule_of_three():
    # 1000 distinct impostor scores 0.0005 .. 0.4995 and 100 genuine scores 0.3 .. 0.995.
    impostor = (np.arange(1000) + 0.5) / 2000.0
    genuine = np.linspace(0.3, 0.995, 100)
    out = E.thresholds_at_fmr(genuine, impostor, targets=(1e-2, 1e-3))
    # 1e-3 needs >= 3000 impostor pairs: omitted, not guessed.
    assert [t["target_fmr"] for t in out] == [0.01]
    t = out[0]
    jsonschema.validate(t, THRESHOLD_SCHEMA)
    # m = 10 false matches allowed: the cut lies between the 11th (0.49475) and 10th (0.49525) highest.
    assert 0.49475 < t["angular_similarity"] <= 0.49525
    assert t["impostor_pairs"] == 1000 and t["false_matches"] == 10
    assert t["fmr"] == 0.01
    assert t["fmr_upper_95"] == pytest.approx(rate_upper_bound(10, 1000))
    # fnmr: genuine scores below the cut: 0.3 + 0.00702 * i < 0.49 -> i <= 27 -> 28 of 100
    assert t["fnmr"] == pytest.approx(0.28)
    # The stored cosine and angular similarity describe the same cut.
    assert float(angular_similarity(t["cosine"])) == pytest.approx(t["angular_similarity"], abs=1e-6)


def test_thresholds_ties_are_pushed_up():
    impostor = np.full(400, 0.5)
    out = E.thresholds_at_fmr([], impostor, targets=(1e-2,))
    assert out[0]["false_matches"] == 0 and out[0]["angular_similarity"] > 0.5
    assert out[0]["fnmr"] is None
    with pytest.raises(ValueError):
        E.thresholds_at_fmr([], impostor, targets=(0.0,))


def test_recall_at_k_and_neighbours_blocked():
    # Two tight clusters on a circle; item 4 is a "label 0" item sitting in the label-1 cluster.
    angles = np.array([0.0, 0.1, 0.2, 3.0, 3.05, 3.1, 3.2])
    emb = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    labels = np.array([0, 0, 0, 1, 0, 1, 1])
    idx, cos = E.nearest_neighbours(emb, k=2, block=3)
    assert idx[0].tolist() == [1, 2] and idx[4].tolist()[0] in (3, 5)
    assert np.all(idx != np.arange(7)[:, None])
    np.testing.assert_allclose(cos[0], np.cos([0.1, 0.2]), rtol=1e-5)
    r = E.recall_at_k(emb, labels, ks=(1, 2), block=2)
    # k=1 misses: item 4 (neighbours 1-labelled), and items 3 and 5 (nearest is 4, label 0) -> 4/7
    # k=2 misses only item 4 (both neighbours label 1) -> 6/7
    assert r == {1: pytest.approx(4 / 7), 2: pytest.approx(6 / 7)}
    # Blocks do not change the answer.
    rng = np.random.default_rng(0)
    big = l2_normalize(rng.standard_normal((300, 8)))
    lab = rng.integers(0, 5, 300)
    assert E.recall_at_k(big, lab, (1, 5), block=7) == E.recall_at_k(big, lab, (1, 5), block=1000)


def test_seed_protocol():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 20)
    centres = l2_normalize(rng.standard_normal((5, 16)))
    good = l2_normalize(centres[labels] + 0.05 * rng.standard_normal((100, 16)))
    res = E.seed_protocol(good, labels, seed=0)
    assert res["auc"] == 1.0 and res["pairs"] == 100
    assert res["genuine"].shape == (100,) and res["genuine"].min() > res["impostor"].max()
    # The pairs behind the scores: same class / other class, and the scores are theirs.
    a, p, n = res["anchors"], res["positives"], res["negatives"]
    assert (labels[a] == labels[p]).all() and (a != p).all() and (labels[a] != labels[n]).all()
    np.testing.assert_allclose(res["genuine"], angular_similarity(np.sum(good[a] * good[p], axis=1)), atol=1e-6)
    noise = l2_normalize(rng.standard_normal((100, 16)))
    a = E.seed_protocol(noise, labels, seed=0)
    b = E.seed_protocol(noise, labels, seed=0)
    assert a["auc"] == b["auc"] and 0.3 < a["auc"] < 0.7
    # A singleton class is skipped, not an error.
    res = E.seed_protocol(good[:41], labels[:41], seed=0)
    assert res["pairs"] == 40


def test_all_pair_scores_and_calibrate_class():
    emb = l2_normalize(np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [-1, 0]], np.float32))
    labels = np.array([0, 0, 1, 1, 2])
    same, diff = all_pair_scores(emb, labels, block=2)
    assert len(same) == 2 and len(diff) == 8
    full = angular_similarity(emb @ emb.T)
    want_same = sorted([full[0, 1], full[2, 3]])
    np.testing.assert_allclose(sorted(same), want_same, rtol=1e-6)
    res = E.calibrate_class(emb, labels, targets=(0.5, 0.01))
    assert [t["target_fmr"] for t in res["thresholds"]] == [0.5]  # 8 pairs support only 3/8 or more
    assert res["auc"] == 1.0


def test_calibrate_instance_with_pixel_embedding():
    # Embedding = the normalised, centred pixels: copies of the same image stay closer than other images.
    rng = np.random.default_rng(2)
    images = np.zeros((60, 28, 28), np.uint8)
    for i in range(60):
        r, c = rng.integers(2, 14, 2)
        images[i, r:r + 12, c:c + rng.integers(4, 14)] = rng.integers(100, 255)

    def embed(x):
        v = x.reshape(len(x), -1).astype(np.float32)
        return l2_normalize(v - v.mean(axis=1, keepdims=True))

    res = E.calibrate_instance(embed, images, seed=0, targets=(1e-2, 1e-3))
    assert len(res["genuine"]) == 60 and len(res["impostor"]) == 60 * 59 // 2
    assert [t["target_fmr"] for t in res["thresholds"]] == [1e-2]  # 1770 pairs < 3000
    assert res["auc"] > 0.8
    again = E.calibrate_instance(embed, images, seed=0, targets=(1e-2,))
    np.testing.assert_array_equal(res["genuine"], again["genuine"])


def test_plots_are_written(tmp_path):
    rng = np.random.default_rng(3)
    g, i = rng.uniform(0.6, 1, 200), rng.uniform(0.3, 0.8, 2000)
    thr = E.thresholds_at_fmr(g, i, (1e-2,))
    roc = E.plot_roc({"class": (g, i), "instance": (g, i[:500])}, str(tmp_path / "p" / "roc.png"))
    hist = E.plot_similarity_hist({"class": (g, i)}, str(tmp_path / "hist.png"), {"class": thr})
    for path in (roc, hist):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rank_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(4)
    g = np.round(rng.uniform(0.4, 1.0, 300), 2)   # rounding makes plenty of ties
    i = np.round(rng.uniform(0.0, 0.7, 2000), 2)
    assert E.rank_auc(g, i) == pytest.approx(E.roc_auc(g, i), abs=1e-12)
    assert E.rank_auc([0.5], [0.5]) == 0.5


def test_roc_points_follow_fmr_fnmr():
    g = np.array([0.9, 0.8, 0.7, 0.6])
    i = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    fmr, tmr = E.roc_points(g, i, points=50)
    assert fmr.min() == 0.0 and fmr.max() == 1.0 and tmr.max() == 1.0
    # At the threshold 0.7 exactly: FMR 2/5 and TMR 3/4 is on the curve.
    assert any(np.isclose(fmr, 0.4) & np.isclose(tmr, 0.75))


def _map_at_r_loop(emb, labels):
    sims = emb @ emb.T
    out = []
    for i in range(len(emb)):
        r = int((labels == labels[i]).sum()) - 1
        if r < 1:
            continue
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:r]
        rel = np.array([labels[j] == labels[i] for j in order])
        out.append(np.sum(np.cumsum(rel) / np.arange(1, r + 1) * rel) / r)
    return float(np.mean(out))


def test_map_at_r_exact_and_against_a_loop():
    from trainer.evaluate import map_at_r
    # 1-d "embeddings" on a circle: query 0 (label 0) sees 1 (label 0) then 2 (label 1): AP = 1.
    emb = np.array([[1, 0], [0.99, 0.141], [0.9, 0.436], [-1, 0]], np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([0, 0, 1, 1])
    # queries: 0 -> [1] AP 1; 1 -> [0] AP 1; 2 -> nearest is 1 (label 0): AP 0; 3 -> nearest 2: AP 1.
    assert map_at_r(emb, labels) == pytest.approx(0.75)
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((120, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 5, 120)
    assert map_at_r(emb, labels, block=17) == pytest.approx(_map_at_r_loop(emb, labels), abs=1e-9)


def test_tmr_at_fmr_and_extra_plots(tmp_path):
    from trainer.evaluate import plot_example_pairs, plot_fmr_fnmr, tmr_at_fmr
    impostor = np.linspace(0.0, 0.5, 1000)
    genuine = np.array([0.3, 0.6, 0.7, 0.8])
    rows = tmr_at_fmr(genuine, impostor, targets=(1e-2, 1e-4))
    assert [r["target_fmr"] for r in rows] == [0.01]  # 1e-4 would need 30,000 impostor pairs
    assert rows[0]["tmr"] == 0.75 and rows[0]["impostor_pairs"] == 1000 and rows[0]["fmr"] <= 0.01
    p1 = plot_fmr_fnmr({"x": (genuine, impostor)}, str(tmp_path / "f.png"))
    img = np.zeros((8, 8), np.uint8)
    p2 = plot_example_pairs([("weak", img, img, 0.5), ("strong", img[..., None], img[..., None], 0.9)],
                            str(tmp_path / "e.png"))
    assert os.path.getsize(p1) > 1000 and os.path.getsize(p2) > 1000
