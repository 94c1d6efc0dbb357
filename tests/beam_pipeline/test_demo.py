"""The demo: its catalogue writer, and the whole job end to end on a tiny slice through the CLI."""
import csv
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_pipeline import cli
from beam_pipeline.demo import write_catalogue, write_photo_catalogue
from trainer.copy_edits import EDIT_FAMILIES, MIRROR
from schemas import validate_report, validate_table


def test_catalogue_plants_copies_and_keeps_the_truth(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    catalogue = write_catalogue(images, np.arange(20) % 4, str(tmp_path), planted=4, max_copies=2, seed=5)
    files = sorted(os.listdir(tmp_path / "images"))
    with open(catalogue.manifest_csv) as f:
        manifest = list(csv.DictReader(f))
    copies = [row for row in manifest if int(row["copy_number"]) > 0]
    assert 4 <= len(copies) <= 8
    assert catalogue.items == len(files) == 20 + len(copies) + 3
    assert sorted(row["item_id"] for row in manifest) == files
    # every original with k copies contributes (k+1 choose 2) pairs, each ordered left < right
    per_source = {}
    for row in manifest:
        if row["broken"] == "":
            per_source.setdefault(row["source_index"], []).append(row["item_id"])
    expected = sum(len(m) * (len(m) - 1) // 2 for m in per_source.values())
    with open(catalogue.ground_truth_csv) as f:
        pairs = list(csv.reader(f))[1:]
    assert len(pairs) == catalogue.planted_pairs == expected
    assert all(left < right for left, right in pairs)
    # a copy is an edited version of its original, not a byte copy
    original = {row["source_index"]: row["item_id"] for row in manifest if row["copy_number"] == "0"}
    copy = copies[0]
    with open(tmp_path / "images" / copy["item_id"], "rb") as a, open(tmp_path / "images" / original[copy["source_index"]], "rb") as b:
        assert a.read() != b.read()


def test_planting_more_than_the_catalogue_is_refused(tmp_path):
    with pytest.raises(ValueError, match="planted must lie in"):
        write_catalogue(np.zeros((3, 28, 28), np.uint8), np.zeros(3), str(tmp_path), planted=4)


def test_demo_end_to_end_on_a_tiny_slice(tmp_path, capsys):
    out = str(tmp_path / "demo")
    cli.main(["demo", "--output", out, "--parts", "fashion_mnist", "--max_train_items", "600", "--epochs", "1",
              "--catalogue_size", "60", "--planted", "6", "--threshold", "0.97"])
    printed = capsys.readouterr().out
    with open(os.path.join(out, "demo_summary.json")) as f:
        summary = json.load(f)
    # every output named in the summary exists and is named in what was printed
    for path in (summary["model_dir"], summary["report"]["report_json"], summary["report"]["report_html"],
                 summary["catalogue"]["ground_truth_csv"], summary["embed"]["templates"], summary["review"]["html"]):
        assert os.path.exists(path), path
        assert path in printed
    assert summary["review"]["pairs"] == summary["review"]["above"] + summary["review"]["below"] > 0
    for stage in ("train", "catalogue", "embed", "match", "dedup", "report", "review export", "total"):
        assert summary["seconds"][stage] > 0
    templates = validate_table(pq.read_table(os.path.join(out, "templates")), "templates")
    failures = validate_table(pq.read_table(os.path.join(out, "failures")), "failures")
    assert templates.num_rows + failures.num_rows == summary["catalogue"]["items"]
    assert failures.num_rows == summary["catalogue"]["broken_items"] == 3
    with open(os.path.join(out, "report.json")) as f:
        report = validate_report(json.load(f))
    assert report["threshold"]["source"] == "given"
    assert report["evaluation"]["planted_pairs"] == summary["catalogue"]["planted_pairs"]
    assert "seed-protocol ROC AUC" in printed and "recall@1" in printed and "planted duplicates" in printed


def test_photo_catalogue_records_one_edit_family_per_copy(tmp_path):
    rng = np.random.default_rng(0)
    photos = rng.integers(0, 256, size=(30, 48, 48, 3), dtype=np.uint8)
    catalogue = write_photo_catalogue(photos, str(tmp_path), planted_fraction=0.5, max_copies=3, seed=2,
                                      mirror=False)
    with open(catalogue.manifest_csv) as f:
        manifest = list(csv.DictReader(f))
    copies = [row for row in manifest if int(row["copy_number"]) > 0]
    assert len({row["source_index"] for row in copies}) == 15
    assert {row["edit"] for row in copies} <= set(EDIT_FAMILIES) - {MIRROR}
    assert all(row["edit"] == "" for row in manifest if row["copy_number"] == "0")
    assert catalogue.items == 30 + len(copies) + 3 == len(os.listdir(tmp_path / "images"))
    with open(catalogue.ground_truth_csv) as f:
        pairs = list(csv.reader(f))[1:]
    groups = {}
    for row in manifest:
        if not row["broken"]:
            groups.setdefault(row["source_index"], []).append(row["item_id"])
    assert len(pairs) == catalogue.planted_pairs == sum(len(g) * (len(g) - 1) // 2 for g in groups.values())


def test_demo_photo_part_end_to_end_on_a_tiny_catalogue(tmp_path, capsys):
    from trainer import photo_corpus
    try:
        photo_corpus.photo_files(photo_corpus.DEFAULT_SPLIT["heldout"])
    except FileNotFoundError as err:
        pytest.skip(f"the photo packages are not installed: {err}")
    out = str(tmp_path / "demo")
    cli.main(["demo", "--output", out, "--parts", "photos", "--photo_items", "60",
              "--photo_train_args", "--epochs 2 --classes_per_batch 4 --per_class 8 --instance_test_items 30"])
    printed = capsys.readouterr().out
    with open(os.path.join(out, "demo_summary.json")) as f:
        photos = json.load(f)["photos"]
    assert photos["match"]["threshold"]["source"] == "self_calibrated"
    assert "chosen for expected false pairs" in printed and "planted duplicates, clusters" in printed
    with open(os.path.join(out, "photos", "report.json")) as f:
        report = validate_report(json.load(f))
    assert report["threshold"]["self_calibration"]["catalogue_items"] == photos["embed"]["embedded"]
    assert set(report["evaluation"]["families"]) <= set(EDIT_FAMILIES)
    assert photos["embed"]["embedded"] + photos["embed"]["failed"] == photos["catalogue"]["items"]
