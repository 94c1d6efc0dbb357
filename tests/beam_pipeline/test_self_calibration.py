"""beam_pipeline.self_calibration: pair sampling, exact counts, the truncated tail fit and the budget."""
import numpy as np
import pytest

from beam_pipeline import self_calibration as sc
from siamese_core.similarity import angular_similarity


def _unit(rng, n, d=16):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sample_pair_scores_is_every_pair_when_small_and_uniform_when_not():
    rng = np.random.default_rng(0)
    emb = _unit(rng, 40)
    scores, exhaustive, pairs = sc.sample_pair_scores(emb, 10_000, rng)
    iu = np.triu_indices(40, 1)
    assert exhaustive and np.allclose(np.sort(scores), np.sort(angular_similarity((emb @ emb.T)[iu])))
    np.testing.assert_allclose(scores, angular_similarity((emb @ emb.T)[pairs]), atol=1e-6)  # the pairs named
    sampled, exhaustive, (i, j) = sc.sample_pair_scores(emb, 500, rng)
    assert not exhaustive and len(sampled) == 500
    np.testing.assert_allclose(sampled, angular_similarity(np.einsum("kd,kd->k", emb[i], emb[j])), atol=1e-6)
    assert np.all(sampled < 1.0), "a pair is never an item with itself"


@pytest.mark.parametrize("block", [7, 2048])
def test_count_pairs_at_or_above_equals_brute_force(block):
    rng = np.random.default_rng(1)
    emb = _unit(rng, 60, 4)
    grid = sc.threshold_grid(0.4)[::40]
    counts, exact = sc.count_pairs_at_or_above(emb, grid, rng, block=block)
    sims = angular_similarity(emb @ emb.T)[np.triu_indices(60, 1)]
    assert exact and np.array_equal(counts, [np.sum(sims >= t) for t in grid])
    scaled, exact = sc.count_pairs_at_or_above(emb, grid, rng, max_items=40)
    assert not exact and scaled[0] == pytest.approx(counts[0], rel=0.25)


def _catalogue_scores(rng, n=1500, dups=800):
    """All pairs of a synthetic catalogue: exponential impostor tail, duplicates high up."""
    m = n * (n - 1) // 2
    impostor = 0.6 + rng.exponential(0.02, m - dups)
    duplicate = np.clip(rng.normal(0.95, 0.015, dups), 0, 1)
    return impostor, duplicate, np.clip(rng.normal(0.95, 0.015, 400), 0, 1)


def test_tail_fit_extrapolates_an_exponential_tail_and_ignores_duplicates_above_the_cut():
    rng = np.random.default_rng(2)
    impostor, duplicate, genuine = _catalogue_scores(rng)
    scores = np.concatenate([impostor, duplicate])
    model, notes = sc.fit_tail(scores, genuine)
    assert abs(model.xi) < 0.1, model  # the exponential is the GPD with shape 0
    m = len(scores)
    for t in (0.72, 0.76):  # truth: m * exp(-(t - 0.6) / 0.02) -> about 2,770 and 380 pairs
        truth = np.sum(impostor >= t)
        assert m * model.survival(t) == pytest.approx(truth, rel=0.35), t
    # The share above u comes from the band, not from every pair above u (the 800 duplicates there).
    assert model.share_above_u * m < np.sum(scores >= model.u)


def test_choose_threshold_meets_its_budget_and_states_it():
    rng = np.random.default_rng(3)
    impostor, duplicate, genuine = _catalogue_scores(rng)
    scores = np.concatenate([impostor, duplicate])
    grid = sc.threshold_grid(0.6)
    predicted = np.array([np.sum(scores >= t) for t in grid], float)
    out = sc.choose_threshold(scores, 1500, grid, predicted, genuine, target_precision=0.99, bootstrap=20)
    cal = out["self_calibration"]
    t = out["angular_similarity"]
    assert out["source"] == sc.SOURCE and out["cosine"] == pytest.approx(np.cos(np.pi * (1 - t)))
    assert cal["expected_false_pairs"] <= 0.01 * cal["predicted_pairs"] + 1e-9
    lo, hi = cal["expected_false_pairs_ci95"]
    assert lo <= cal["expected_false_pairs"] <= hi
    true_false = np.sum(impostor >= t)
    assert true_false <= 0.02 * cal["predicted_pairs"], "the real false pairs stay within the budget"
    assert cal["expected_copy_recall"]["estimate"] > 0.9
    strict = sc.choose_threshold(scores, 1500, grid, predicted, genuine, target_precision=None,
                                 max_false_pairs=0.01, bootstrap=5)
    assert strict["angular_similarity"] > t and strict["self_calibration"]["expected_false_pairs"] <= 0.01
    with pytest.raises(ValueError, match="exactly one"):
        sc.choose_threshold(scores, 1500, grid, predicted, genuine, target_precision=0.99, max_false_pairs=3)


def test_no_threshold_meeting_the_budget_falls_back_to_the_highest_a_run_may_use():
    """Copies no better than look-alikes (a class-level encoder): no grid point meets the budget, and the
    fallback is thresholds.MAX_THRESHOLD, at which identical content still matches, not a cut near 1
    (0.99992 before) that float32 embeddings of one image may miss."""
    from beam_pipeline.thresholds import MAX_THRESHOLD
    from siamese_core.similarity import angular_similarity

    grid = sc.threshold_grid(0.6)
    assert grid[-1] == pytest.approx(MAX_THRESHOLD) and grid.max() <= MAX_THRESHOLD
    rng = np.random.default_rng(4)
    scores = 0.6 + rng.exponential(0.04, 300_000)  # every pair an impostor, up to 1: no level meets 1%
    scores = scores[scores < 1.0]
    predicted = np.array([np.sum(scores >= t) for t in grid], float)
    out = sc.choose_threshold(scores, 800, grid, predicted, None, target_precision=0.99, bootstrap=5)
    assert out["angular_similarity"] == pytest.approx(MAX_THRESHOLD)
    assert any("no threshold on the grid meets the budget" in n for n in out["self_calibration"]["notes"])
    v = _unit(rng, 50, 64)
    assert np.all(angular_similarity(np.einsum("kd,kd->k", v, v.copy())) >= out["angular_similarity"])
    # A tail that starts above every usable threshold: a clear refusal, not an empty sweep.
    alike = 1.0 - rng.exponential(0.0003, 300_000)
    alike = alike[alike < 1.0]
    with pytest.raises(sc.CalibrationError, match="too alike"):
        sc.choose_threshold(alike, 800, grid, np.array([np.sum(alike >= t) for t in grid], float), None,
                            target_precision=0.99, bootstrap=5)


def test_a_catalogue_whose_pairs_have_no_tail_is_refused():
    scores = np.full(5000, 0.999)
    with pytest.raises(sc.CalibrationError, match="look alike"):
        sc.fit_tail(scores, np.full(10, 0.9995))


def _photos(n, side=64, seed=0):
    """n distinct smooth random RGB 'photos' (blurred noise at two scales), uint8 (n, side, side, 3)."""
    import cv2
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = cv2.resize(rng.random((6, 6, 3)).astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
        fine = cv2.GaussianBlur(rng.random((side, side, 3)).astype(np.float32), (0, 0), 2)
        out.append(np.clip((0.7 * coarse + 0.5 * fine) * 200, 0, 255).astype(np.uint8))
    return np.stack(out)


def _embed_catalogue(tmp_path, model_dir, n):
    from beam_pipeline import embed
    from beam_pipeline.demo import write_photo_catalogue
    cat = write_photo_catalogue(_photos(n), str(tmp_path / "cat"), planted_fraction=0.3, max_copies=2, seed=1)
    work = str(tmp_path / "work")
    embed.run(["--input", cat.image_glob, "--model_dir", model_dir, "--output", work, "--run_id", "e"])
    return cat, work


def test_match_without_threshold_flags_chooses_one_for_the_catalogue(tmp_path, tiny_rgb_model_dir):
    from apache_beam.testing import test_pipeline

    from beam_pipeline import match
    from beam_pipeline.io import read_json, read_table_dir
    cat, work = _embed_catalogue(tmp_path, tiny_rgb_model_dir, 90)
    out = match.run(["--templates", f"{work}/templates/*.parquet", "--model_dir", tiny_rgb_model_dir,
                     "--output", work, "--calibration_copies", "40", "--run_id", "m"],
                    test_pipeline=test_pipeline.TestPipeline())
    doc = read_json(f"{work}/match_run.json")
    t = doc["threshold"]
    cal = t["self_calibration"]
    assert t["source"] == sc.SOURCE and out["threshold"]["angular_similarity"] == t["angular_similarity"]
    assert cal["catalogue_items"] == cat.items - cat.broken_items == doc["items"]
    assert cal["synthetic_copies"]["made"] == 40 and cal["impostor_sample_exhaustive"]
    assert cal["predicted_pairs"] == doc["pairs"], "the counted pairs are the pairs the pipeline matched"
    sims = read_table_dir(work, "matches").column("angular_similarity").to_numpy()
    assert np.all(sims >= t["angular_similarity"] - 1e-6)
    assert cal["expected_false_pairs"] <= (1 - sc.DEFAULT_TARGET_PRECISION) * max(cal["predicted_pairs"], 1) + 1e-9 or \
        cal["predicted_pairs"] == 0


def test_self_calibration_refuses_a_catalogue_too_small_and_mixed_threshold_flags(tmp_path, tiny_rgb_model_dir):
    from beam_pipeline import match
    _, work = _embed_catalogue(tmp_path, tiny_rgb_model_dir, 20)
    base = ["--templates", f"{work}/templates/*.parquet", "--model_dir", tiny_rgb_model_dir, "--output", work]
    with pytest.raises(sc.CalibrationError, match="needs at least 50.*--threshold"):
        match.run(base)
    with pytest.raises(ValueError, match="at most one of"):
        match.run(base + ["--threshold", "0.9", "--target_fmr", "1e-4"])
    with pytest.raises(ValueError, match="needs --model_dir"):
        match.run(["--templates", f"{work}/templates/*.parquet", "--output", work])


def test_copy_to_copy_duplicates_count_on_the_conservative_side():
    """Copy-to-copy pairs score lower than copy-original ones and are left out of the tail mixture (their
    density, given a weight of its own, took impostors for duplicates on real catalogues): those in the
    band count as impostors, so the false pairs are over-stated there, never under-stated."""
    rng = np.random.default_rng(7)
    n = 1200
    m = n * (n - 1) // 2
    impostor = 0.62 + rng.exponential(0.025, m - 900)
    originals = np.clip(rng.normal(0.95, 0.02, 600), 0, 1)   # copy-original pairs
    copies = np.clip(rng.normal(0.88, 0.03, 300), 0, 1)      # copy-copy pairs: lower
    scores = np.concatenate([impostor, originals, copies])
    model, notes = sc.fit_tail(scores, np.clip(rng.normal(0.95, 0.02, 400), 0, 1))
    assert model.method == "mixture" and not notes
    assert model.duplicate_share * m == pytest.approx(600, rel=0.25)  # the copy-original pairs
    for t in (0.76, 0.8, 0.84):
        truth = np.sum(impostor >= t)
        assert truth <= m * model.survival(t) <= 4 * truth, t


def test_without_copies_the_fit_is_truncated_and_says_so():
    rng = np.random.default_rng(8)
    impostor, duplicate, _ = _catalogue_scores(rng)
    model, notes = sc.fit_tail(np.concatenate([impostor, duplicate]), None)
    assert model.method == "truncated" and any("no synthetic copies" in x for x in notes)


def test_self_calibration_on_knn_normalised_scores(tmp_path, tiny_rgb_model_dir):
    """Every score self-calibration sees is normalised like the matches: sampled pairs, counts and copies."""
    from apache_beam.testing import test_pipeline

    from beam_pipeline import match
    from beam_pipeline.io import read_json, read_table_dir
    cat, work = _embed_catalogue(tmp_path, tiny_rgb_model_dir, 90)
    out = match.run(["--templates", f"{work}/templates/*.parquet", "--model_dir", tiny_rgb_model_dir,
                     "--output", work, "--calibration_copies", "40", "--score_norm", "knn", "--run_id", "m"],
                    test_pipeline=test_pipeline.TestPipeline())
    t = read_json(f"{work}/match_run.json")["threshold"]
    cal = t["self_calibration"]
    assert t["source"] == sc.SOURCE and t["score"] == "knn_normalised" and t["angular_similarity"] is None
    assert t["knn"] == {"k": 10, "beta": 0.5} and out["threshold"]["value"] == t["value"]
    assert cal["predicted_pairs"] == out["pairs"], "the counted pairs are the pairs the pipeline matched"
    matches = read_table_dir(work, "matches")
    assert np.all(matches.column("score").to_numpy() >= t["value"] - 1e-6)
    # A normalised score is the angular similarity less beta x the pair's mean b (b in [0, 1]).
    gap = matches.column("angular_similarity").to_numpy() - matches.column("score").to_numpy()
    assert np.all((gap >= 0) & (gap <= 0.5 + 1e-6))
    assert cal["synthetic_copies"]["made"] == 40
    # The copies are scored the same way: their scores sit below the same copies' angular similarities.
    plain = match.run(["--templates", f"{work}/templates/*.parquet", "--model_dir", tiny_rgb_model_dir,
                       "--output", str(tmp_path / "plain"), "--calibration_copies", "40", "--run_id", "p"],
                      test_pipeline=test_pipeline.TestPipeline())["threshold"]
    assert plain["score"] == "angular_similarity"
    assert cal["synthetic_copies"]["median_score"] < plain["self_calibration"]["synthetic_copies"]["median_score"] - 0.05
