"""The match pipeline on a tiny hand-made templates table, under TestPipeline (DirectRunner)."""
import datetime
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline

from beam_pipeline import match
from beam_pipeline.io import read_json, read_table_dir
from siamese_core.similarity import angular_similarity, cosine_from_angular

MODEL = "0123456789abcdef"
# Components chosen so the cosines are known: a.c = 0.8, b.c = 0.96, d.e = 0.8, a.b = 0.6, b.e = 0.48,
# c.e = 0.36, everything else 0.
VECTORS = {
    "a": [1.0, 0.0, 0.0],
    "b": [0.6, 0.8, 0.0],
    "c": [0.8, 0.6, 0.0],
    "d": [0.0, 0.0, 1.0],
    "e": [0.0, 0.6, 0.8],
}


def write_templates(path, vectors, model_id=MODEL, dim=None):
    """Write a templates Parquet file (schemas.templates_schema) with the given {item_id: vector}."""
    from schemas.tables import templates_schema

    dim = dim or len(next(iter(vectors.values())))
    ids = list(vectors)
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    table = pa.table(
        {
            "item_id": ids,
            "source_uri": [f"/nowhere/{i}.png" for i in ids],
            "content_sha256": ["0" * 64] * len(ids),
            "embedding": [list(map(float, vectors[i])) for i in ids],
            "model_id": [model_id] * len(ids),
            "width": [28] * len(ids),
            "height": [28] * len(ids),
            "embedded_at": [now] * len(ids),
            "run_id": ["embed-run"] * len(ids),
        },
        schema=templates_schema(dim),
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture
def catalogue(tmp_path):
    """Two shards, ids out of order, so blocks of 2 split the sorted ids as a b | c d | e."""
    d = tmp_path / "templates"
    write_templates(str(d / "templates-00000-of-00002.parquet"), {k: VECTORS[k] for k in ["e", "c", "a"]})
    write_templates(str(d / "templates-00001-of-00002.parquet"), {k: VECTORS[k] for k in ["d", "b"]})
    return str(d / "*.parquet")


def _run(argv):
    return match.run(argv, test_pipeline=test_pipeline.TestPipeline())


def _card(tmp_path, model_id=MODEL):
    entry = {"target_fmr": 1e-3, "angular_similarity": 0.75, "cosine": float(cosine_from_angular(0.75)),
             "impostor_pairs": 5000, "fmr": 4e-4, "fmr_upper_95": 9e-4, "fnmr": 0.02}
    card = {"model_id": model_id, "embedding_dim": 3, "card_version": 2, "artifact_sha256": "0" * 64,
            "input_spec": {"height": 28, "width": 28, "channels": 1, "dtype": "uint8", "value_range": [0, 255]},
            "training": {}, "data": {}, "metrics": {}, "thresholds": {"instance": [entry]}}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_card.json").write_text(json.dumps(card))
    return str(model_dir)


def test_matches_across_blocks_exactly(catalogue, tmp_path):
    out = str(tmp_path / "out")
    summary = _run(["--templates", catalogue, "--output", out, "--threshold", "0.75", "--block_size", "2",
                    "--run_id", "r1"])
    # cos(pi/4) = 0.7071: a-c (0.8), b-c (0.96), d-e (0.8) pass; a-b (0.6) does not.
    table = read_table_dir(out, "matches").sort_by([("left_id", "ascending"), ("right_id", "ascending")])
    assert list(zip(table.column("left_id").to_pylist(), table.column("right_id").to_pylist())) == [
        ("a", "c"), ("b", "c"), ("d", "e")
    ]
    cos = table.column("cosine").to_numpy()
    np.testing.assert_allclose(cos, [0.8, 0.96, 0.8], atol=1e-6)
    np.testing.assert_array_equal(table.column("angular_similarity").to_numpy(), angular_similarity(cos))
    assert set(table.column("model_id").to_pylist()) == {MODEL}
    assert set(table.column("run_id").to_pylist()) == {"r1"}
    assert summary["pairs"] == 3 and summary["items"] == 5
    assert summary["threshold"]["source"] == "given" and summary["threshold"]["angular_similarity"] == 0.75
    run_doc = read_json(os.path.join(out, "match_run.json"))
    assert run_doc["run_id"] == "r1" and run_doc["model_id"] == MODEL
    assert (run_doc["items"], run_doc["pairs"], run_doc["block_pairs"]) == (5, 3, 6)
    assert run_doc["threshold"] == summary["threshold"]


def test_threshold_from_model_card_and_rerun_replaces_output(catalogue, tmp_path):
    out = str(tmp_path / "out")
    _run(["--templates", catalogue, "--output", out, "--threshold", "0.6", "--num_shards", "3"])
    # A lower threshold first (3 shards), then the card's: no stale shard may survive.
    summary = _run(["--templates", catalogue, "--output", out, "--model_dir", _card(tmp_path),
                    "--target_fmr", "0.001", "--block_size", "3", "--num_shards", "1"])
    assert summary["threshold"]["source"] == "model_card:instance@fmr=0.001"
    assert summary["threshold"]["impostor_pairs"] == 5000
    assert summary["pairs"] == 3
    assert read_table_dir(out, "matches").num_rows == 3
    assert len(os.listdir(os.path.join(out, "matches"))) == 1


def test_no_pairs_still_writes_an_empty_table(catalogue, tmp_path):
    out = str(tmp_path / "out")
    summary = _run(["--templates", catalogue, "--output", out, "--threshold", "0.99"])
    assert summary["pairs"] == 0
    assert read_table_dir(out, "matches").num_rows == 0


def _refused(argv, message):
    with pytest.raises(ValueError, match=message):
        match.run(argv)  # refused before any pipeline is built


def test_refuses_mixed_models(tmp_path):
    write_templates(str(tmp_path / "t" / "t-1.parquet"), {"a": VECTORS["a"]})
    write_templates(str(tmp_path / "t" / "t-2.parquet"), {"b": VECTORS["b"]}, model_id="fedcba9876543210")
    _refused(["--templates", str(tmp_path / "t" / "*.parquet"), "--output", str(tmp_path / "o"),
              "--threshold", "0.7"], "2 different models")


def test_refuses_mixed_dimensions(tmp_path):
    write_templates(str(tmp_path / "t" / "t-1.parquet"), {"a": VECTORS["a"]})
    write_templates(str(tmp_path / "t" / "t-2.parquet"), {"b": [0.6, 0.8]})
    _refused(["--templates", str(tmp_path / "t" / "*.parquet"), "--output", str(tmp_path / "o"),
              "--threshold", "0.7"], "mix embedding dimensions 2 .*, 3 ")


def test_refuses_duplicate_ids_and_non_unit_embeddings(tmp_path):
    write_templates(str(tmp_path / "t" / "t-1.parquet"), {"a": VECTORS["a"]})
    write_templates(str(tmp_path / "t" / "t-2.parquet"), {"a": VECTORS["b"]})
    _refused(["--templates", str(tmp_path / "t" / "*.parquet"), "--output", str(tmp_path / "o"),
              "--threshold", "0.7"], "duplicate")
    write_templates(str(tmp_path / "u" / "t-1.parquet"), {"a": [1.0, 1.0, 0.0]})
    _refused(["--templates", str(tmp_path / "u" / "*.parquet"), "--output", str(tmp_path / "o"),
              "--threshold", "0.7"], "unit vectors")


def test_refuses_a_card_of_another_model(catalogue, tmp_path):
    _refused(["--templates", catalogue, "--output", str(tmp_path / "o"),
              "--model_dir", _card(tmp_path, model_id="fedcba9876543210")], "model fedcba9876543210")


def test_refuses_missing_calibration(catalogue, tmp_path):
    _refused(["--templates", catalogue, "--output", str(tmp_path / "o"), "--model_dir", _card(tmp_path),
              "--target_fmr", "1e-5"], "no 'instance' threshold at FMR 1e-05; it has FMR 0.001")


def test_queries_top_k_and_an_item_never_matches_itself(catalogue, tmp_path):
    # q1 is a copy of c; the query 'c' is also a catalogue item and must not match itself.
    write_templates(str(tmp_path / "q" / "q.parquet"), {"q1": VECTORS["c"], "c": VECTORS["c"]})
    out = str(tmp_path / "out")
    summary = _run(["--templates", catalogue, "--output", out, "--threshold", "0.75", "--mode", "queries",
                    "--queries", str(tmp_path / "q" / "*.parquet"), "--top_k", "1", "--block_size", "2"])
    table = read_table_dir(out, "matches").sort_by([("left_id", "ascending"), ("right_id", "ascending")])
    assert list(zip(table.column("left_id").to_pylist(), table.column("right_id").to_pylist())) == [
        ("b", "c"), ("c", "q1")
    ]
    np.testing.assert_allclose(table.column("cosine").to_numpy(), [0.96, 1.0], atol=1e-6)
    assert summary["mode"] == "queries" and summary["pairs"] == 2
    summary = _run(["--templates", catalogue, "--output", out, "--threshold", "0.75", "--mode", "queries",
                    "--queries", str(tmp_path / "q" / "*.parquet"), "--top_k", "0"])
    # All at or above the threshold: q1-{a, b, c}, c-{a, b}; (c, q1) and (b, c) are not repeated.
    assert summary["pairs"] == 5


def test_pairs_mode_verifies_every_given_pair(catalogue, tmp_path):
    (tmp_path / "pairs.csv").write_text("left_id,right_id\na,c\ne,b\nd,e\n")
    out = str(tmp_path / "out")
    summary = _run(["--templates", catalogue, "--output", out, "--threshold", "0.75", "--mode", "pairs",
                    "--pairs", str(tmp_path / "pairs.csv"), "--block_size", "2"])
    v = read_table_dir(out, "verifications").sort_by("left_id")
    assert list(zip(v.column("left_id").to_pylist(), v.column("right_id").to_pylist(),
                    v.column("is_match").to_pylist())) == [("a", "c", True), ("b", "e", False), ("d", "e", True)]
    np.testing.assert_allclose(v.column("cosine").to_numpy(), [0.8, 0.48, 0.8], atol=1e-6)
    m = read_table_dir(out, "matches").sort_by("left_id")
    assert m.column("left_id").to_pylist() == ["a", "d"] and summary["pairs"] == 2
    (tmp_path / "bad.csv").write_text("left_id,right_id\na,zzz\n")
    _refused(["--templates", catalogue, "--output", out, "--threshold", "0.75", "--mode", "pairs",
              "--pairs", str(tmp_path / "bad.csv")], "not among the templates, e.g. 'zzz'")


def test_refuses_nan_naming_the_item(tmp_path):
    write_templates(str(tmp_path / "t" / "t-1.parquet"), {"a": VECTORS["a"], "b": [np.nan, 0.0, 1.0]})
    _refused(["--templates", str(tmp_path / "t" / "*.parquet"), "--output", str(tmp_path / "o"),
              "--threshold", "0.7"], "item 'b' has NaN")
    assert not os.path.exists(tmp_path / "o" / "_staging")  # nothing left behind


def _clustered(n, d, seed):
    """Unit vectors around 6 centres, every 4th row a near-copy (cosine ~0.97-0.999) of the row before."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, d))
    x = centres[rng.integers(0, 6, n)] + 0.35 * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    copies = np.arange(3, n, 4)
    x[copies] = x[copies - 1] + rng.uniform(0.01, 0.06, (len(copies), 1)) * rng.standard_normal((len(copies), d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _pairs(out):
    t = read_table_dir(out, "matches")
    return set(zip(t.column("left_id").to_pylist(), t.column("right_id").to_pylist()))


def test_approximate_is_exact_without_a_cap_and_measures_its_recall(tmp_path):
    x = _clustered(1200, 16, 0)
    write_templates(str(tmp_path / "t" / "t.parquet"), {f"i{k:05d}": v for k, v in enumerate(x)})
    glob = str(tmp_path / "t" / "*.parquet")
    common = ["--templates", glob, "--threshold", "0.9", "--block_size", "256"]
    # The exact pairs from the exact kernel in this process (tested against brute force in test_matching;
    # the same float32 products as the pipeline, so pairs a hair from the threshold fall the same way).
    from beam_pipeline import matching

    i, j, _ = matching.pairs_above_threshold(x, x, float(cosine_from_angular(0.9)), same_block=True)
    exact = {(f"i{a:05d}", f"i{b:05d}") for a, b in zip(i.tolist(), j.tolist())}
    assert len(exact) > 250
    # 8 partitions, up to 8 assignments each: the margin is never capped, so nothing can be missed.
    s = _run(common + ["--output", str(tmp_path / "a8"), "--search", "approximate", "--partitions", "8",
                       "--max_assign", "8", "--recall_sample", "300"])
    assert _pairs(str(tmp_path / "a8")) == exact
    doc = read_json(str(tmp_path / "a8" / "match_run.json"))
    assert doc["capped_items"] == 0 and doc["partitions"] == 8
    assert s["recall"]["recall"] == 1.0 and s["recall"]["pairs"] > 0
    # One assignment each: pairs split across partitions are lost, and the measured recall (sample = all
    # items) is exactly the share of the exact pairs found.
    s = _run(common + ["--output", str(tmp_path / "a1"), "--search", "approximate", "--partitions", "8",
                       "--max_assign", "1", "--recall_sample", "1200"])
    approx = _pairs(str(tmp_path / "a1"))
    assert approx < exact
    assert s["recall"]["pairs"] == len(exact) and s["recall"]["found"] == len(approx)
    assert s["recall"]["recall"] == pytest.approx(len(approx) / len(exact))
    assert s["recall"]["recall_lower_95"] < s["recall"]["recall"]
    assert not os.path.exists(tmp_path / "a1" / "_staging")


def test_knn_normalised_scores_cut_the_threshold_and_dedup_keeps_to_complete_linkage(tmp_path):
    from beam_pipeline import dedup
    from siamese_core.similarity import knn_normalised

    x = _clustered(60, 8, seed=4)
    ids = [f"i{k:03d}" for k in range(len(x))]
    write_templates(str(tmp_path / "out" / "templates" / "templates-00000-of-00001.parquet"), dict(zip(ids, x)))
    templates, out = str(tmp_path / "out" / "templates" / "*.parquet"), str(tmp_path / "out")
    summary = _run(["--templates", templates, "--output", out, "--threshold", "0.45", "--score_norm", "knn",
                    "--knn_k", "5", "--knn_beta", "0.5", "--block_size", "16", "--run_id", "k1"])
    sims = angular_similarity(x @ x.T).astype(np.float64)
    others = sims.copy()
    np.fill_diagonal(others, -np.inf)
    b = np.sort(others, axis=1)[:, ::-1][:, 4]
    score = knn_normalised(sims, b[:, None], b[None, :], 0.5)
    expected = {(ids[i], ids[j]) for i in range(len(x)) for j in range(i + 1, len(x)) if score[i, j] >= 0.45}
    assert _pairs(out) == expected and 20 < len(expected) < 200
    table = read_table_dir(out, "matches")
    rows = [(ids.index(a), ids.index(c)) for a, c in zip(table.column("left_id").to_pylist(),
                                                         table.column("right_id").to_pylist())]
    np.testing.assert_allclose(table.column("score").to_numpy(), [score[i, j] for i, j in rows], atol=1e-5)
    np.testing.assert_allclose(table.column("angular_similarity").to_numpy(), [sims[i, j] for i, j in rows],
                               atol=1e-6)
    t = read_json(os.path.join(out, "match_run.json"))["threshold"]
    assert t == summary["threshold"]
    assert (t["value"], t["score"], t["angular_similarity"], t["cosine"]) == (0.45, "knn_normalised", None, None)
    assert t["knn"] == {"k": 5, "beta": 0.5} and t["score_norm"]["method"] == "knn"
    with pytest.raises(ValueError, match="single linkage.*normalised"):
        dedup.run(["--templates", templates, "--matches", f"{out}/matches/*.parquet", "--output", out,
                   "--linkage", "single"])
    clusters = dedup.run(["--templates", templates, "--matches", f"{out}/matches/*.parquet", "--output", out])
    assert clusters["threshold"] == 0.45
    from beam_pipeline import report
    written = read_json(report.run(["--workdir", out])["report_json"])
    assert written["threshold"]["score"] == "knn_normalised" and written["threshold"]["value"] == 0.45
    assert written["similarity_histogram"]["of"] == "matched pairs (knn normalised)"
    assert "kNN-normalised score" in open(os.path.join(out, "report.html")).read()


def test_knn_scores_where_they_cannot_apply(catalogue, tmp_path):
    out = str(tmp_path / "out")
    _refused(["--templates", catalogue, "--output", out, "--threshold", "0.7", "--score_norm", "knn",
              "--mode", "queries", "--queries", catalogue], "all_pairs --search exact")
    _refused(["--templates", catalogue, "--output", out, "--model_dir", _card(tmp_path), "--target_fmr", "1e-3",
              "--score_norm", "knn"], "angular thresholds")
    _refused(["--templates", catalogue, "--output", out, "--threshold", "0.7", "--score_norm", "knn",
              "--knn_k", "5"], "more than k=5 items")


def test_a_card_asking_for_knn_scores_is_followed_only_where_they_apply(catalogue, tmp_path):
    model_dir = _card(tmp_path)
    path = os.path.join(model_dir, "model_card.json")
    card = json.loads(open(path).read())
    card["training"] = {"score_norm": "knn"}
    open(path, "w").write(json.dumps(card))
    out = str(tmp_path / "out")
    summary = _run(["--templates", catalogue, "--output", out, "--model_dir", model_dir, "--threshold", "0.75"])
    t = summary["threshold"]
    assert t["score"] == "angular_similarity" and t["score_norm"]["method"] == "none"
    assert "given or card threshold is an angular similarity" in t["score_norm"]["note"]
    # A self-calibrated run follows the card, unless the catalogue has no k-th neighbour to normalise by.
    opts = match.MatchOptions(["--templates", "t", "--output", "o"])
    assert match.score_norm(opts, card, "self_calibrated", 500) == ("knn", None)
    norm, note = match.score_norm(opts, card, "self_calibrated", 5)
    assert norm == "none" and "no 10th neighbour" in note
