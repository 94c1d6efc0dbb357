"""A short run of bench/fuzz_stages.py (the 220-run fuzz is in BENCHMARKS.md), and its checks catching
what they are there to catch."""
from __future__ import annotations

import shutil

import pytest

from tests.scripts import load_script

pytest.importorskip("keras")



def _fuzz_module():
    return load_script("bench/fuzz_stages.py")


def test_a_short_fuzz_finds_nothing(tmp_path, capsys):
    fuzz = _fuzz_module()
    code = fuzz.main(["--runs", "14", "--seed", "3", "--work_dir", str(tmp_path / "fz"),
                      "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert '"silently_wrong": 0' in out and '"lost_items": 0' in out


def test_the_checks_see_stale_matches_lost_items_and_debris(tmp_path, tiny_model_dir):
    from beam_pipeline import cli

    fuzz = _fuzz_module()
    cat = tmp_path / "cat"
    cat.mkdir()
    for k in range(4):
        fuzz.Catalogue._png(None, str(cat / f"i{k}.png"), k)
    work = tmp_path / "work"
    assert cli.main(["embed", "--input", f"{cat}/*.png", "--model_dir", tiny_model_dir, "--output", str(work)]) == 0
    assert cli.main(["match", "--templates", f"{work}/templates/*.parquet", "--output", str(work),
                     "--threshold", "0.999"]) == 0
    entries = {f"i{k}.png" for k in range(4)}
    assert fuzz.check_workdir(str(work), entries) == []
    assert any(p.startswith("lost items") for p in fuzz.check_workdir(str(work), entries | {"gone.png"}))
    (work / "_staging").mkdir()
    assert any(p.startswith("debris") for p in fuzz.check_workdir(str(work), entries))
    (work / "_staging").rmdir()
    # Matches of other templates planted beside these (what the stages now refuse to leave).
    kept = tmp_path / "kept"
    shutil.copytree(work / "matches", kept)
    fuzz.Catalogue._png(None, str(cat / "i0.png"), 99)
    assert cli.main(["embed", "--input", f"{cat}/*.png", "--model_dir", tiny_model_dir, "--output", str(work)]) == 0
    shutil.copytree(kept, work / "matches")
    assert any(p.startswith("silently wrong: matches made from other templates")
               for p in fuzz.check_workdir(str(work), entries))
