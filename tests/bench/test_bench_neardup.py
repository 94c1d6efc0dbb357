"""bench/bench_neardup.py's scoring on tiny hand-made inputs: pairs from clusters, overall and per edit family
precision/recall/F1, the best-threshold sweep and the error ratio. No peer (imagededup, fastdup) and no
TensorFlow is needed: loading the script imports neither."""
import os
import subprocess
import sys

import pytest

from tests.scripts import load_script

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_neardup.py")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/bench_neardup.py")


def test_loading_imports_no_peer_and_no_tensorflow():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('b', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(sorted(n for n in ('fastdup', 'imagededup', 'tensorflow', 'apache_beam') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, _PATH], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pairs_from_clusters(bench):
    ids = ["c", "a", "b", "d", "e", "f"]
    clusters = [1, 1, 1, 2, 3, 3]
    assert bench.pairs_from_clusters(ids, clusters) == {("a", "b"), ("a", "c"), ("b", "c"), ("e", "f")}
    assert bench.pairs_from_clusters(["x", "y"], [0, 1]) == set()
    assert bench.pairs_from_clusters([], []) == set()


def test_prf_counts_and_edge_cases(bench):
    truth = {("a", "b"), ("a", "c"), ("b", "c"), ("d", "e")}
    pred = {("a", "b"), ("d", "e"), ("x", "y")}
    r = bench.prf(pred, truth)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 2)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 4)
    assert r["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    empty = bench.prf(set(), truth)
    assert empty["precision"] is None and empty["recall"] == 0 and empty["f1"] == 0
    assert bench.prf(set(), set())["f1"] is None
    assert bench.prf(pred, set())["recall"] is None and bench.prf(pred, set())["f1"] == 0


def test_restrict_drops_broken_and_orients(bench):
    kept, dropped = bench.restrict([("b", "a"), ("a", "broken"), ("c", "c")], {"a", "b", "c"})
    assert kept == {("a", "b")} and dropped == 2


def test_per_family(bench):
    # originals o1, o2; o1's copies: g (grey) and r (rotate); o2's copy: g2 (grey)
    edit_of = {"o1": "", "o2": "", "g": "grey", "r": "rotate", "g2": "grey"}
    truth = {("g", "o1"), ("o1", "r"), ("g", "r"), ("g2", "o2")}
    pred = {("g", "o1"), ("g2", "o2"), ("o1", "o2"), ("g", "g2")}
    fam = bench.per_family(pred, truth, edit_of, ["grey", "rotate"])
    # grey: truth = (g,o1), (g,r), (g2,o2); predicted = (g,o1), (g2,o2), (g,g2) -> tp 2
    assert (fam["grey"]["tp"], fam["grey"]["predicted"], fam["grey"]["truth"]) == (2, 3, 3)
    assert fam["grey"]["precision"] == pytest.approx(2 / 3) and fam["grey"]["recall"] == pytest.approx(2 / 3)
    # rotate: truth = (o1,r), (g,r); nothing predicted touches r
    assert fam["rotate"]["predicted"] == 0 and fam["rotate"]["recall"] == 0 and fam["rotate"]["f1"] == 0
    # the pair of originals (o1,o2) is a false positive overall but belongs to no family
    assert bench.prf(pred, truth)["fp"] == 2


def test_threshold_pairs_and_sweep_similarity(bench):
    truth = {("a", "b"), ("c", "d")}
    scored = {("a", "b"): 0.99, ("c", "d"): 0.80, ("a", "c"): 0.90, ("b", "d"): 0.50}
    assert bench.threshold_pairs(scored, 0.9, True) == {("a", "b"), ("a", "c")}
    curve = bench.sweep(scored, truth, True)
    assert [row["threshold"] for row in curve] == [0.99, 0.90, 0.80, 0.50]
    assert [row["tp"] for row in curve] == [1, 1, 2, 2]
    best = bench.best_threshold(scored, truth, True)
    # 0.99: P 1, R .5 -> F1 2/3; 0.90: F1 .5; 0.80: P 2/3, R 1 -> F1 .8; 0.50: F1 2/3
    assert best["threshold"] == 0.80 and best["f1"] == pytest.approx(0.8)


def test_best_threshold_distances_with_candidates_and_ties(bench):
    truth = {("a", "b"), ("c", "d")}
    scored = {("a", "b"): 0, ("c", "d"): 3, ("a", "c"): 5}
    curve = bench.sweep(scored, truth, False, range(0, 7))
    assert [row["predicted"] for row in curve] == [1, 1, 1, 2, 2, 3, 3]
    best = bench.best_threshold(scored, truth, False, range(0, 7))
    assert best["threshold"] == 3 and best["f1"] == pytest.approx(1.0)  # 3 and 4 tie: the strictest wins
    assert bench.threshold_pairs(scored, 3, False) == truth
    assert bench.best_threshold({}, set(), True) is None


def test_error_ratio_and_ratios(bench):
    assert bench.error_ratio(0.9, 0.8) == pytest.approx(0.5)
    assert bench.error_ratio(None, 0.8) is None and bench.error_ratio(0.9, 1.0) is None
    rows = [{"method": "ours", "kind": "own", "tool": "ours", "f1": 0.95},
            {"method": "ours best", "kind": "best", "tool": "ours", "f1": 0.96},
            {"method": "p default", "kind": "default", "tool": "imagededup", "f1": 0.8},
            {"method": "q default", "kind": "default", "tool": "fastdup", "f1": 0.9},
            {"method": "q best", "kind": "best", "tool": "fastdup", "f1": 0.92}]
    r = bench.ratios(rows)
    assert r["default"]["best_peer"] == "q default" and r["default"]["ratio"] == pytest.approx(0.5)
    assert r["default"]["meets_target"] is True
    assert r["best"]["ratio"] == pytest.approx(0.04 / 0.08) and r["best"]["ours"] == "ours best"


def test_score_row_and_table(bench):
    cat = {"universe": {"o", "c", "x"}, "truth": {("c", "o")}, "edit_of": {"o": "", "c": "crop", "x": ""},
           "families": ["crop"]}
    row = bench.score_row("m", "default", [("o", "c"), ("o", "broken")], cat, threshold=10, seconds=1.5,
                          skipped=1)
    assert row["f1"] == 1.0 and row["dropped_pairs"] == 1 and row["per_family"]["crop"]["f1"] == 1.0
    table = bench.markdown_table([row], cat["families"])
    assert "| m | 10 | 1.000 | 1.000 | 1.000 | 0.000 | 1.5 | 1 | 1.00 |" in table


def test_read_catalogue(bench, tmp_path):
    (tmp_path / "manifest.csv").write_text(
        "item_id,source_index,label,copy_number,broken,edit\n"
        "a.jpg,0,x,0,,\nb.jpg,0,x,1,,grey\nc.png,0,x,2,,crop\nd.jpg,1,y,0,,\nz.jpg,-1,,0,empty,\n")
    (tmp_path / "ground_truth.csv").write_text("left_id,right_id\na.jpg,b.jpg\na.jpg,c.png\nb.jpg,c.png\n")
    c = bench.read_catalogue(str(tmp_path))
    assert c["broken"] == {"z.jpg"} and c["families"] == ["crop", "grey"] and len(c["truth"]) == 3
    s = bench.catalogue_summary(str(tmp_path), c)
    assert (s["copies"], s["originals"], s["planted_pairs"]) == (2, 2, 3)
    assert s["families"]["grey"] == {"copies": 1, "planted_pairs": 2}


def test_false_pairs_along_curve_counts_the_truth_at_each_point(bench):
    truth = {("a", "b")}
    scored = {("a", "b"): 0.95, ("a", "c"): 0.9, ("b", "c"): 0.85, ("c", "d"): 0.7}
    curve = [{"threshold": 0.6, "expected_false_pairs": 9.0},
             {"threshold": 0.8, "expected_false_pairs": 3.0},
             {"threshold": 0.88, "expected_false_pairs": 2.0},
             {"threshold": 0.93, "expected_false_pairs": 0.5}]
    rows = bench.false_pairs_along_curve(curve, scored, truth, floor=0.65)
    assert [r["threshold"] for r in rows] == [0.8, 0.88, 0.93]  # 0.6 is below the sweep's floor
    assert [r["true"] for r in rows] == [2, 1, 0]
    assert [r["ratio"] for r in rows] == [1.5, 2.0, None]
    summary = bench.curve_summary(rows, least_true=1)
    assert (summary["points"], summary["ratio_min"], summary["ratio_max"]) == (2, 1.5, 2.0)
    assert summary["within_factor_2"] is True
    assert bench.curve_summary(rows, least_true=3) == {"least_true_false_pairs": 3, "points": 0, "ratio_min": None,
                                                       "ratio_max": None, "within_factor_2": None}
    rows[0]["ratio"] = 2.5
    assert bench.curve_summary(rows, least_true=1)["within_factor_2"] is False


def test_linkage_rows_forgive_one_weak_link_where_complete_linkage_splits(bench, tmp_path):
    """An original o with two copies c1, c2 (each close to o, the copies a little further apart) and an
    unrelated x: complete linkage at a threshold above sim(c1, c2) splits the group; average linkage keeps it."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    def unit(deg):
        return [float(np.cos(np.radians(deg))), float(np.sin(np.radians(deg))), 0.0]
    # angular similarity = 1 - angle/180: o-c1 and o-c2 0.9444 (10 deg), c1-c2 0.8889 (20 deg); x far away.
    rows = {"item_id": ["o", "c1", "c2", "x"], "embedding": [unit(0), unit(10), unit(-10), [0.0, 0.0, 1.0]]}
    pq.write_table(pa.table(rows), tmp_path / "t.parquet")
    cat = {"universe": {"o", "c1", "c2", "x"}, "truth": {("c1", "o"), ("c2", "o"), ("c1", "c2")},
           "edit_of": {"o": "", "c1": "crop", "c2": "grey", "x": ""}, "families": ["crop", "grey"]}
    ids, sim = bench.template_similarities(str(tmp_path / "*.parquet"), cat)
    got = {r["kind"]: r for r in bench.linkage_rows(ids, sim, cat, 0.9, {"tool": "ours"})}
    assert got["linkage_complete"]["f1"] == pytest.approx(2 * 1 / (1 + 3))  # one pair of the three
    assert got["linkage_average"]["f1"] == 1.0 and got["linkage_average"]["tool"] == "ours"
    assert bench.template_similarities(str(tmp_path / "none-*.parquet"), cat) is None


def test_bench_trim_judges_each_family_by_what_its_edit_adds():
    trim = load_script("bench/bench_trim.py")
    assert trim.judge("original", (256, 256), (0, 256, 0, 256)) is True
    assert trim.judge("crop", (200, 180), (0, 190, 0, 180)) is False  # a crop adds no band: nothing to cut
    assert trim.judge("caption", (300, 256), (44, 300, 0, 256)) is True
    assert trim.judge("caption", (300, 256), (100, 300, 0, 256)) is False  # cut into the photo
    assert trim.judge("screenshot", (250, 230), (0, 250, 0, 230)) is False  # the chrome was left on
    assert trim.judge("screenshot", (250, 230), (36, 240, 12, 216)) is True
    assert trim.judge("jpeg", (256, 256), (0, 10, 0, 10)) is None


def test_knn_normalisation_pulls_down_pairs_in_a_dense_region(bench):
    import numpy as np
    # Items 0-3 crowd together (distinct look-alikes), 4 and 5 are a copy pair in a sparse region.
    sim = np.array([[1.0, 0.9, 0.9, 0.9, 0.1, 0.1],
                    [0.9, 1.0, 0.9, 0.9, 0.1, 0.1],
                    [0.9, 0.9, 1.0, 0.9, 0.1, 0.1],
                    [0.9, 0.9, 0.9, 1.0, 0.1, 0.1],
                    [0.1, 0.1, 0.1, 0.1, 1.0, 0.8],
                    [0.1, 0.1, 0.1, 0.1, 0.8, 1.0]])
    out = bench.knn_normalised(sim, k=2, beta=1.0)
    # 2nd neighbour: 0.9 for items 0-3, 0.1 for items 4 and 5.
    assert out[0, 1] == pytest.approx(0.9 - 0.9) and out[4, 5] == pytest.approx(0.8 - 0.1)
    assert out[4, 5] > out[0, 1]  # raw scores ranked them the other way
    assert np.allclose(bench.knn_normalised(sim, k=2, beta=0.0), sim)
