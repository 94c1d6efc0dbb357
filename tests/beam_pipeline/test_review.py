"""The review loop: export the pairs near the threshold, import a person's labels, recalibrate, and the next
match run states the reviewed threshold."""
import csv
import datetime
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from PIL import Image

from beam_pipeline import dedup, match, report, review
from schemas.tables import templates_schema
from siamese_core.similarity import angular_similarity, l2_normalize

MODEL = "feedfacecafebeef"
N = 30
THRESHOLD = 0.8


def _vectors():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(N, 8))
    emb[1::3] = emb[0::3][: len(emb[1::3])] + rng.normal(scale=0.5, size=(len(emb[1::3]), 8))
    return l2_normalize(emb).astype(np.float32)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("review")
    os.makedirs(d / "images")
    os.makedirs(d / "templates")
    emb = _vectors()
    ids = [f"item{k:02d}" for k in range(N)]
    for k, item in enumerate(ids):
        Image.fromarray(np.full((24, 24, 3), 8 * k, np.uint8)).save(d / "images" / f"{item}.png")
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    templates = pa.table(
        {"item_id": ids, "source_uri": [str(d / "images" / f"{i}.png") for i in ids],
         "content_sha256": ["0" * 64] * N, "embedding": emb.tolist(), "model_id": [MODEL] * N,
         "width": [24] * N, "height": [24] * N, "embedded_at": [now] * N, "run_id": ["r"] * N},
        schema=templates_schema(8))
    pq.write_table(templates, d / "templates" / "templates-00000-of-00001.parquet")
    glob = str(d / "templates" / "*.parquet")
    match.run(["--templates", glob, "--output", str(d), "--threshold", str(THRESHOLD), "--run_id", "r1"],
              test_pipeline=test_pipeline.TestPipeline())
    dedup.run(["--templates", glob, "--matches", str(d / "matches" / "*.parquet"), "--output", str(d),
               "--run_id", "r1"], test_pipeline=test_pipeline.TestPipeline())
    return d


def _all_pairs():
    emb = _vectors()
    i, j = np.triu_indices(N, 1)
    return i, j, angular_similarity(np.einsum("kd,kd->k", emb[i], emb[j]))


def test_export_writes_the_pairs_nearest_the_threshold(workdir):
    out = review.export(str(workdir), 10)
    assert (out["above"], out["below"]) == (5, 5)
    rows = list(csv.DictReader(open(out["csv"])))
    assert pq.read_table(out["parquet"]).num_rows == len(rows) == 10
    _, _, s = _all_pairs()
    above, below = np.sort(s[s >= THRESHOLD]), np.sort(s[s < THRESHOLD])[::-1]
    got_above = sorted(float(r["score"]) for r in rows if r["side"] == "above")
    got_below = sorted((float(r["score"]) for r in rows if r["side"] == "below"), reverse=True)
    np.testing.assert_allclose(got_above, above[:5], atol=1e-5)
    np.testing.assert_allclose(got_below, below[:5], atol=1e-5)
    assert all(r["left_id"] < r["right_id"] and r["label"] == "" and r["model_id"] == MODEL for r in rows)
    assert all(os.path.exists(r["left_uri"]) for r in rows)
    page = open(out["html"]).read()
    assert page.count("data:image/png;base64,") == 20 and "review import" in page


def _label(workdir, tmp_path, rule, name="labels.csv"):
    """Export 12 pairs and label them with rule(score) -> label; the labelled CSV's path."""
    out = review.export(str(workdir), 12, str(tmp_path / "review"))
    rows = list(csv.DictReader(open(out["csv"])))
    for r in rows:
        r["label"] = rule(float(r["score"]))
    path = tmp_path / name
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path, rows


def test_import_recalibrates_and_the_next_match_states_it(workdir, tmp_path):
    # The person calls duplicates only what scores >= a cut above the run's threshold: the weakest matches
    # are distinct, so the threshold moves up past them: just above the highest distinct one (the least move
    # from the previous threshold that agrees with every label).
    scores = sorted(float(r["score"]) for r in csv.DictReader(open(review.export(str(workdir), 12,
                                                                                 str(tmp_path / "probe"))["csv"])))
    above = [s for s in scores if s >= THRESHOLD]
    cut = above[2]  # the two weakest matches are not duplicates
    path, rows = _label(workdir, tmp_path, lambda s: "duplicate" if s >= cut else "distinct")
    doc = review.import_labels(str(path), str(workdir), str(tmp_path / "out"))
    assert above[1] < doc["value"] <= cut and doc["errors"] == 0
    assert (doc["labelled_pairs"], doc["duplicates"], doc["distinct"]) == (12, len([s for s in scores if s >= cut]),
                                                                           len([s for s in scores if s < cut]))
    assert doc["previous"] == {"value": THRESHOLD, "source": "given"}
    negatives = list(csv.DictReader(open(doc["hard_negatives"])))
    assert len(negatives) == doc["distinct"] and all(float(r["score"]) < cut for r in negatives)
    assert {"left_uri", "right_uri"} <= set(negatives[0]) and all(r["label"] == "distinct" for r in negatives)

    glob = str(workdir / "templates" / "*.parquet")
    rerun = tmp_path / "rerun"
    summary = match.run(["--templates", glob, "--output", str(rerun), "--review_threshold", doc["review_threshold"],
                         "--run_id", "r2"], test_pipeline=test_pipeline.TestPipeline())
    run_doc = json.loads((rerun / "match_run.json").read_text())
    t = run_doc["threshold"]
    assert t["source"] == "review" and t["value"] == doc["value"]
    assert t["review"]["labelled_pairs"] == 12 and t["review"]["previous"]["value"] == THRESHOLD
    _, _, s = _all_pairs()
    assert summary["pairs"] == int((s >= np.float32(cut) - 1e-6).sum())
    dedup.run(["--templates", glob, "--matches", str(rerun / "matches" / "*.parquet"), "--output", str(rerun),
               "--run_id", "r2"], test_pipeline=test_pipeline.TestPipeline())
    # The report reads templates from the work directory.
    os.symlink(workdir / "templates", rerun / "templates")
    report.run(["--workdir", str(rerun)])
    page = (rerun / "report.html").read_text()
    assert "Recalibrated on a person&#x27;s labels" in page or "Recalibrated on a person's labels" in page
    assert json.loads((rerun / "report.json").read_text())["threshold"]["review"]["errors"] == 0


def test_import_refuses_bad_labels(workdir, tmp_path):
    path, _ = _label(workdir, tmp_path, lambda s: "maybe")
    with pytest.raises(ValueError, match="duplicate, distinct or blank"):
        review.import_labels(str(path), str(workdir), str(tmp_path / "o1"))
    path, _ = _label(workdir, tmp_path, lambda s: "", name="blank.csv")
    with pytest.raises(ValueError, match="nothing to recalibrate"):
        review.import_labels(str(path), str(workdir), str(tmp_path / "o2"))
    (tmp_path / "cols.csv").write_text("left_id,right_id,label\na,b,duplicate\n")
    with pytest.raises(ValueError, match="missing"):
        review.import_labels(str(tmp_path / "cols.csv"), str(workdir), str(tmp_path / "o3"))
    path, rows = _label(workdir, tmp_path, lambda s: "duplicate", name="other.csv")
    table = pa.Table.from_pylist([{**r, "score": float(r["score"]), "model_id": "0" * 16} for r in rows])
    pq.write_table(table, tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="export the pairs again"):
        review.import_labels(str(tmp_path / "other.parquet"), str(workdir), str(tmp_path / "o4"))


def test_match_refuses_a_review_threshold_of_another_model(workdir, tmp_path):
    path, _ = _label(workdir, tmp_path, lambda s: "duplicate" if s >= THRESHOLD else "distinct")
    doc = review.import_labels(str(path), str(workdir), str(tmp_path / "o"))
    other = json.loads(open(doc["review_threshold"]).read())
    other["model_id"] = "0" * 16
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="calibrated for model"):
        match.run(["--templates", str(workdir / "templates" / "*.parquet"), "--output", str(tmp_path / "m"),
                   "--review_threshold", str(tmp_path / "other.json")], test_pipeline=test_pipeline.TestPipeline())
    with pytest.raises(ValueError, match="at most one of"):
        match.run(["--templates", str(workdir / "templates" / "*.parquet"), "--output", str(tmp_path / "m"),
                   "--review_threshold", doc["review_threshold"], "--threshold", "0.9"],
                  test_pipeline=test_pipeline.TestPipeline())


@pytest.mark.parametrize("scores,labels,previous,want,errors", [
    # Labels agree with the previous threshold: it stays.
    ([0.70, 0.75, 0.81, 0.85], [0, 0, 1, 1], 0.80, 0.80, 0),
    # The weakest "matches" are distinct: up, just past the highest of them.
    ([0.70, 0.81, 0.82, 0.85], [0, 0, 0, 1], 0.80, np.nextafter(0.82, 1), 0),
    # Pairs below were duplicates: down to the lowest of them (the nearest cut that takes them in).
    ([0.70, 0.74, 0.77, 0.85], [0, 1, 1, 1], 0.80, 0.74, 0),
    # Overlap: one error is unavoidable; among the best cuts, the one nearest the previous threshold.
    ([0.70, 0.78, 0.79, 0.85], [0, 1, 0, 1], 0.80, 0.80, 1),
])
def test_recalibrate_rule(scores, labels, previous, want, errors):
    got = review.recalibrate(np.array(scores), np.array(labels, bool), previous)
    assert got["value"] == pytest.approx(want, abs=1e-12) and got["errors"] == errors
    assert got["errors"] == got["distinct_at_or_above"] + got["duplicates_below"]


def test_a_bad_match_run_json_is_refused_naming_the_file(tmp_path):
    from schemas.tables import SchemaError

    (tmp_path / "match_run.json").write_text(json.dumps({"run_id": "r", "model_id": "m", "mode": "all_pairs"}))
    where = re.escape(f"{tmp_path}/match_run.json: at (top level): 'threshold' is a required property")
    with pytest.raises(SchemaError, match=where):
        review.borderline_pairs(str(tmp_path), 4)
