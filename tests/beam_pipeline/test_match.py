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
from trainer.distances import angular_similarity, cosine_from_angular

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
    card = {"model_id": model_id, "embedding_dim": 3,
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
