"""report.json / report.html / figures on a tiny run (match + dedup under TestPipeline), numbers checked
against hand counts; and the report's metrics on their own."""
import base64
import datetime
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from PIL import Image

from beam_pipeline import dedup, match, report, report_metrics
from schemas.documents import validate_report
from schemas.tables import FAILURES_SCHEMA, templates_schema

MODEL = "0123456789abcdef"
# a.c = 0.8, b.c = 0.96, d.e = 0.8 (matched at angular 0.75, cosine 0.7071); f is far from everything.
VECTORS = {"a": [1, 0, 0], "b": [0.6, 0.8, 0], "c": [0.8, 0.6, 0], "d": [0, 0, 1], "e": [0, 0.6, 0.8],
           "f": [0, -1, 0]}
# Groups {a, b, c, g} (g failed to embed) and {d, f}; (b, c) and the pairs with g come from the closure.
PLANTED = "left_id,right_id\na,b\nc,a\ng,a\nd,f\n"
ANG_08 = 1 - np.arccos(0.8) / np.pi  # 0.79517


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    os.makedirs(d / "images")
    uris = {}
    for k, item in enumerate(VECTORS):
        path = d / "images" / f"{item}.png"
        Image.fromarray(np.full((28, 28), 40 * k, np.uint8)).save(path)
        uris[item] = str(path)
    uris["e"] = str(d / "images" / "gone.png")  # unreadable: a placeholder in the gallery
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    ids = list(VECTORS)
    templates = pa.table(
        {"item_id": ids, "source_uri": [uris[i] for i in ids], "content_sha256": ["0" * 64] * 6,
         "embedding": [list(map(float, VECTORS[i])) for i in ids], "model_id": [MODEL] * 6,
         "width": [28] * 6, "height": [28] * 6, "embedded_at": [now] * 6, "run_id": ["r"] * 6},
        schema=templates_schema(3),
    )
    os.makedirs(d / "templates")
    pq.write_table(templates, d / "templates" / "templates-00000-of-00001.parquet")
    failures = pa.table({"item_id": ["g", "h"], "source_uri": ["/x/g", "/x/h"], "stage": ["decode", "read"],
                         "error": ["ValueError: bad", "OSError: gone"], "run_id": ["r", "r"]}, schema=FAILURES_SCHEMA)
    os.makedirs(d / "failures")
    pq.write_table(failures, d / "failures" / "failures-00000-of-00001.parquet")
    glob = str(d / "templates" / "*.parquet")
    match.run(["--templates", glob, "--output", str(d), "--threshold", "0.75", "--run_id", "r"],
              test_pipeline=test_pipeline.TestPipeline())
    # Single linkage: the hand counts below are of connected components ({a,b,c} is a chain: a-b unmatched).
    dedup.run(["--templates", glob, "--matches", str(d / "matches" / "*.parquet"), "--output", str(d),
               "--run_id", "r", "--linkage", "single"], test_pipeline=test_pipeline.TestPipeline())
    (d / "planted.csv").write_text(PLANTED)
    return d


def test_report_numbers_equal_hand_counts(workdir):
    summary = report.run(["--workdir", str(workdir), "--ground_truth", str(workdir / "planted.csv"),
                         "--linkage", "single",  # the fixture's dedup ran single linkage
                          "--target_fmr", "0.3"])
    doc = json.loads((workdir / "report.json").read_text())
    validate_report(doc)
    assert doc["model_id"] == MODEL and doc["run_id"] == "r"
    assert doc["threshold"]["source"] == "given" and doc["threshold"]["angular_similarity"] == 0.75
    assert doc["counts"] == {"items": 6, "failures": 2, "pairs": 3, "clusters": 2, "items_to_drop": 3,
                             "chained_clusters": 0}
    assert (doc["matching"]["mode"], doc["matching"]["search"], doc["matching"]["recall"]) == ("all_pairs", "exact", None)
    assert doc["matching"]["products"] == 15  # 6 items, one block: the upper triangle
    assert doc["failures_by_stage"] == {"read": 1, "decode": 1, "inference": 0, "validate": 0}
    hist = doc["similarity_histogram"]
    assert len(hist["bin_edges"]) == 21 and hist["bin_edges"][0] == 0.75 and hist["bin_edges"][-1] == 1.0
    expected = [0] * 20
    expected[3], expected[12] = 2, 1  # 0.795 in [0.7875, 0.8); 0.910 in [0.9, 0.9125)
    assert hist["counts"] == expected
    assert hist["genuine_counts"] == [1 if k in (3, 12) else 0 for k in range(20)]

    ev = doc["evaluation"]
    # closed planted pairs: {a,b,c,g} -> 6 (3 involve g), {d,f} -> 1. Clusters {a,b,c}, {d,e}, {f}:
    # predicted pairs 3 + 1, found (a,b), (a,c), (b,c).
    assert (ev["planted_pairs_given"], ev["planted_pairs"], ev["planted_pairs_with_missing_items"]) == (4, 7, 3)
    assert (ev["found_pairs"], ev["predicted_pairs"]) == (3, 4)
    assert ev["precision"] == 0.75 and ev["recall"] == pytest.approx(3 / 7)
    assert (ev["matched_pairs_genuine"], ev["matched_pairs_impostor"]) == (2, 1)
    s0 = ev["sweep"][0]
    assert s0["threshold"] == 0.75
    # 4 evaluable genuine pairs, C(6,2) - 4 = 11 impostor pairs; matched: a-c, b-c genuine, d-e impostor.
    assert (s0["true_matches"], s0["false_matches"], s0["genuine_pairs"], s0["impostor_pairs"]) == (2, 1, 4, 11)
    assert s0["fnmr"] == 0.5 and s0["fmr"] == pytest.approx(1 / 11)
    assert s0["cluster_precision"] == 0.75 and s0["cluster_recall"] == pytest.approx(3 / 7)
    s2 = ev["sweep"][2]  # 0.8: only b-c (0.910) survives
    assert s2["threshold"] == 0.8
    assert (s2["matched_pairs"], s2["true_matches"], s2["false_matches"]) == (1, 1, 0)
    assert s2["fnmr"] == 0.75 and s2["fmr"] == 0.0 and s2["cluster_precision"] == 1.0
    assert s2["fmr_upper_95"] == pytest.approx(1 - 0.05 ** (1 / 11))
    assert summary["evaluation"]["precision"] == 0.75
    assert summary["counts"] == doc["counts"]
    # Cluster level (as the top level) with F1 = 2*3 / (4 + 7); pair level: the 3 matched pairs, of which
    # a-c and b-c are planted: precision 2/3, recall 2/7, F1 = 2*2 / (3 + 7).
    assert ev["f1"] == pytest.approx(6 / 11)
    assert {k: ev["clusters"][k] for k in ("predicted_pairs", "found_pairs", "planted_pairs")} == \
        {"predicted_pairs": 4, "found_pairs": 3, "planted_pairs": 7}
    assert (ev["clusters"]["precision"], ev["clusters"]["f1"]) == (0.75, pytest.approx(6 / 11))
    assert {k: ev["pairs"][k] for k in ("predicted_pairs", "found_pairs", "planted_pairs")} == \
        {"predicted_pairs": 3, "found_pairs": 2, "planted_pairs": 7}
    assert ev["pairs"]["precision"] == pytest.approx(2 / 3) and ev["pairs"]["recall"] == pytest.approx(2 / 7)
    assert ev["pairs"]["f1"] == pytest.approx(0.4) and ev["families"] is None
    assert (s0["pair_precision"], s0["pair_f1"], s0["cluster_f1"], s0["linkage"]) == \
        (pytest.approx(2 / 3), pytest.approx(0.4), pytest.approx(6 / 11), "single")
    assert (s2["pair_precision"], s2["pair_recall"]) == (1.0, pytest.approx(1 / 7))

    assert doc["largest_clusters"][0]["members"] == ["a", "b", "c"]
    # a.b = 0.6 (angular 0.7048): the smallest member similarity, below 0.75 - 0.05: a chain.
    assert doc["largest_clusters"][0]["min_member_similarity"] == pytest.approx(1 - np.arccos(0.6) / np.pi, abs=1e-6)
    assert doc["largest_clusters"][0]["is_chained"] is False
    assert doc["largest_clusters"][0]["min_link_similarity"] == pytest.approx(ANG_08, abs=1e-6)

    # Choosing the threshold: all 15 pairs scored; truth groups {a,b,c} and {d,f} give 4 genuine pairs
    # (a-b 0.7048, a-c 0.7952, b-c 0.9097, d-f 0.5), 11 others.
    a = doc["all_pairs"]
    assert a["exhaustive"] and a["items"] == 6 and a["scale"] == 1.0
    assert sum(a["genuine_counts"]) == 4 and sum(a["impostor_counts"]) == 11
    c = doc["curves"]
    assert (c["genuine_pairs"], c["impostor_pairs"]) == (4, 11)
    gen = np.array([0.7048, ANG_08, 0.9097, 0.5])
    imp = np.array([ANG_08, 0.659, 0.617, 0.5, 0.5, 0.5, 0.5, 0.205, 0.295, 0.295, 0.5])
    from trainer.evaluate import rank_auc
    assert c["auc"] == pytest.approx(rank_auc(gen, imp), abs=0.02)
    given = [r for r in c["at_fmr"] if r["target_fmr"] == 0.3]
    assert len(given) == 1 and given[0]["reached"]  # 3 false matches allowed: just above the four at 0.5
    assert given[0]["false_matches"] == 3 and 0.5 < given[0]["threshold"] <= 0.5 + c["resolution"]
    assert given[0]["fmr_95"][0] < 3 / 11 < given[0]["fmr_95"][1]
    # 11 impostor pairs are too few for the standard targets 1e-2 ... 1e-6
    assert all(not r["reached"] and "rule of three" in r["why"] for r in c["at_fmr"] if r["target_fmr"] < 0.3)
    at_run = [r for r in doc["threshold_sweep"] if r["is_run_threshold"]]
    assert len(at_run) == 1 and at_run[0]["threshold"] == 0.75
    assert (at_run[0]["pairs"], at_run[0]["expected_false_pairs"], at_run[0]["clusters"], at_run[0]["items_to_drop"]) \
        == (3, 1, 2, 3)  # a-c, b-c, d-e of which d-e is not planted; clusters {a,b,c}, {d,e}
    below_run = [r for r in doc["threshold_sweep"] if r["threshold"] < 0.75]
    assert below_run and all(r["clusters"] is None and r["pairs"] >= 3 for r in below_run)
    near = doc["near_threshold"]
    assert [(p["left_id"], p["right_id"], p["planted"]) for p in near["below"][:3]] == \
        [("a", "b", True), ("b", "e", False), ("c", "e", False)]
    assert near["below"][0]["score"] == pytest.approx(1 - np.arccos(0.6) / np.pi, abs=1e-5)
    assert {(p["left_id"], p["right_id"]) for p in near["above"][:2]} == {("a", "c"), ("d", "e")}
    assert near["above"][-1]["score"] == pytest.approx(1 - np.arccos(0.96) / np.pi, abs=1e-5)

    for path in summary["figures"]:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 100
    page = (workdir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(summary["figures"]) == 8 and "src='/" not in page
    assert "name='viewport'" in page  # readable on a phone
    assert "Source: <code>given</code>" in page and "0.750000" in page
    b64 = page.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["outputs"]["report_html"] == str(workdir / "report.html")


def test_report_without_ground_truth_and_with_model_card(workdir, tmp_path):
    card = {"model_id": MODEL, "embedding_dim": 3, "card_version": 2, "artifact_sha256": "0" * 64,
            "input_spec": {"height": 28, "width": 28, "channels": 1, "dtype": "uint8", "value_range": [0, 255]},
            "training": {}, "data": {}, "metrics": {"recall_at_1": 0.91, "seed": {"auc": 0.97}},
            "thresholds": {"instance": []}}
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    summary = report.run(["--workdir", str(workdir), "--model_dir", str(tmp_path), "--gallery_size", "1"])
    doc = json.loads((workdir / "report.json").read_text())
    assert doc["evaluation"] is None and summary["evaluation"] is None
    assert doc["model_card"]["metrics"]["recall_at_1"] == 0.91
    page = (workdir / "report.html").read_text()
    assert "seed.auc" in page and "recall_at_1" in page
    card["model_id"] = "f" * 16
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="run used model"):
        report.run(["--workdir", str(workdir), "--model_dir", str(tmp_path)])


def test_gallery_selection_largest_then_weakest():
    summaries = [
        {"cluster_id": "a", "size": 5, "min_link_similarity": 0.95, "members": []},
        {"cluster_id": "b", "size": 3, "min_link_similarity": 0.99, "members": []},
        {"cluster_id": "c", "size": 2, "min_link_similarity": 0.90, "members": []},
        {"cluster_id": "d", "size": 2, "min_link_similarity": 0.92, "members": []},
    ]
    picked = report.gallery_selection(summaries, 3)
    assert [(why, c["cluster_id"]) for why, c in picked] == [("largest", "a"), ("largest", "b"), ("weakest link", "c")]
    assert report.gallery_selection(summaries, 0) == []


def test_histogram_and_ground_truth_parsing():
    h = report_metrics.similarity_histogram(np.float32([0.5, 0.75, 1.0, 0.4999999]), 0.5, bins=2)
    assert h["bin_edges"] == [0.5, 0.75, 1.0] and h["counts"] == [2, 2]
    with pytest.raises(ValueError, match="below"):
        report_metrics.similarity_histogram(np.float32([0.4]), 0.5)
    assert report_metrics.read_ground_truth("right_id,left_id\nb,a\na,b\nc,d\n") == [("a", "b"), ("c", "d")]
    with pytest.raises(ValueError, match="left_id,right_id"):
        report_metrics.read_ground_truth("x,y\na,b\n")
    with pytest.raises(ValueError, match="itself"):
        report_metrics.read_ground_truth("left_id,right_id\na,a\n")


def test_matching_section_states_the_measured_recall():
    m = report.matching_summary({"mode": "all_pairs", "search": "approximate", "products": 1234567, "partitions": 98,
                                 "max_assign": 3, "capped_items": 17,
                                 "recall": {"recall": 0.995, "found": 995, "pairs": 1000, "sample_items": 1000,
                                            "recall_lower_95": 0.9894}})
    page = report._matching_html(m)
    assert "Approximate search recall: 0.9950</b> (995 of 1000" in page and "lower bound 0.9894" in page
    assert "1,234,567 similarities" in page and "17 items" in page
    assert report.matching_summary({})["search"] == "exact"


# Two originals with copies of two edit families; c3 is a copy that never became a template.
FAMILY_ITEMS = ["o1", "c1a", "c1b", "o2", "c2a", "x"]
FAMILY_PLANTED = [("o1", "c1a"), ("o1", "c1b"), ("o2", "c2a"), ("o2", "c3")]
FAMILIES = {"c1a": "crop", "c2a": "crop", "c1b": "jpeg", "c3": "jpeg", "o1": "", "o2": None}
# Matches chain o1-c1a-x-c1b (x is no duplicate of anything) and find o2-c2a; (c1a, o1) repeats a pair.
FAMILY_MATCHES = [("o1", "c1a", 0.95), ("c1a", "x", 0.92), ("x", "c1b", 0.91), ("o2", "c2a", 0.97),
                  ("c1a", "o1", 0.95)]
FAMILY_CLUSTERS = {"o1": "o1", "c1a": "o1", "x": "o1", "c1b": "o1", "o2": "o2", "c2a": "o2"}


def _family_eval(**kwargs):
    left, right, sim = zip(*FAMILY_MATCHES)
    return report_metrics.evaluate(FAMILY_ITEMS, [FAMILY_CLUSTERS[i] for i in FAMILY_ITEMS], list(left),
                                   list(right), np.float32(sim), FAMILY_PLANTED, 0.9, **kwargs)


def test_pair_and_cluster_level_scores_by_hand():
    ev = _family_eval()
    # True pairs: {o1,c1a,c1b} 3 + {o2,c2a,c3} 3 = 6 (2 with c3, never found).
    # Pairs: 4 distinct matched pairs (the repeat counts once), o1-c1a and o2-c2a true.
    assert ev["pairs"] == {**ev["pairs"], "predicted_pairs": 4, "found_pairs": 2, "planted_pairs": 6,
                           "precision": 0.5, "recall": pytest.approx(1 / 3), "f1": pytest.approx(0.4)}
    # Clusters {o1,c1a,x,c1b} (6 pairs, 3 true) and {o2,c2a} (1, true): 7 predicted, 4 found.
    assert ev["clusters"] == {**ev["clusters"], "predicted_pairs": 7, "found_pairs": 4, "planted_pairs": 6,
                              "precision": pytest.approx(4 / 7), "recall": pytest.approx(4 / 6),
                              "f1": pytest.approx(8 / 13)}
    assert (ev["precision"], ev["recall"], ev["f1"]) == (ev["clusters"]["precision"], ev["clusters"]["recall"],
                                                         ev["clusters"]["f1"])
    assert report_metrics.f1_score(0, 0, 0) is None and report_metrics.f1_score(0, 3, 2) == 0.0
    assert report_metrics.f1_score(2, 4, 6) == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))


def test_per_family_scores_by_hand():
    fam = _family_eval(families=FAMILIES)["families"]
    assert sorted(fam) == ["crop", "jpeg"] and fam["crop"]["items"] == 2 and fam["jpeg"]["items"] == 2
    # crop: true pairs with c1a or c2a: o1-c1a, c1a-c1b, o2-c2a, c2a-c3 = 4. Matched pairs touching crop:
    # o1-c1a, c1a-x, o2-c2a (2 true). Cluster pairs touching crop: c1a with o1, x, c1b; o2-c2a (3 true).
    crop = fam["crop"]
    assert {k: crop["pairs"][k] for k in ("predicted_pairs", "found_pairs", "planted_pairs")} == \
        {"predicted_pairs": 3, "found_pairs": 2, "planted_pairs": 4}
    assert crop["pairs"]["f1"] == pytest.approx(4 / 7) and crop["pairs"]["precision"] == pytest.approx(2 / 3)
    assert {k: crop["clusters"][k] for k in ("predicted_pairs", "found_pairs", "planted_pairs")} == \
        {"predicted_pairs": 4, "found_pairs": 3, "planted_pairs": 4}
    assert crop["clusters"]["f1"] == pytest.approx(0.75)
    # jpeg: true pairs with c1b or c3: o1-c1b, c1a-c1b, o2-c3, c2a-c3 = 4. Matched: x-c1b only (false).
    # Cluster pairs touching c1b: with o1, c1a, x (2 true).
    jpeg = fam["jpeg"]
    assert (jpeg["pairs"]["predicted_pairs"], jpeg["pairs"]["found_pairs"], jpeg["pairs"]["planted_pairs"]) == (1, 0, 4)
    assert (jpeg["pairs"]["precision"], jpeg["pairs"]["recall"], jpeg["pairs"]["f1"]) == (0.0, 0.0, 0.0)
    assert (jpeg["clusters"]["predicted_pairs"], jpeg["clusters"]["found_pairs"]) == (3, 2)
    assert jpeg["clusters"]["f1"] == pytest.approx(4 / 7) and jpeg["clusters"]["recall"] == 0.5
    json.dumps(fam)  # plain Python numbers: report.json can hold it


def test_read_families_from_a_manifest():
    text = "item_id,source,edit\no1,a.png,\nc1a,a.png,crop\nc1b,a.png, jpeg \n"
    assert report_metrics.read_families(text) == {"c1a": "crop", "c1b": "jpeg"}
    assert report_metrics.read_families("item_id,kind\nq,blur\n", family_column="kind") == {"q": "blur"}
    with pytest.raises(ValueError, match="item_id,edit"):
        report_metrics.read_families("item_id,source\no1,a.png\n")
    names, codes = report_metrics.family_codes(["c1b", "o1", "zz"], FAMILIES)
    assert names == ["crop", "jpeg"] and codes.tolist() == [1, -1, -1]


def test_sweep_can_recluster_with_complete_linkage():
    # a-b, b-c matched, a-c not; all three planted as one group.
    args = (["a", "b", "c"], ["a", "a", "a"], ["a", "b"], ["b", "c"], np.float32([0.95, 0.94]),
            [("a", "b"), ("b", "c")], 0.9)
    single = report_metrics.evaluate(*args)["sweep"][0]
    complete = report_metrics.evaluate(*args, sweep_linkage="complete")["sweep"][0]
    assert (single["predicted_pairs"], single["cluster_recall"]) == (3, 1.0)
    assert (complete["predicted_pairs"], complete["cluster_recall"], complete["linkage"]) == (1, pytest.approx(1 / 3),
                                                                                           "complete")
    assert single["pair_f1"] == complete["pair_f1"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="sweep_linkage"):
        report_metrics.evaluate(*args, sweep_linkage="average")
