"""A small run of bench/fuzz_decode.py: 100 mutated image files through the real embed pipeline, zero
crashes, every file in exactly one table with the outcome the direct decode gives. (The 1,000-file run
is in BENCHMARKS.md.)"""
from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.scripts import load_script

pytest.importorskip("keras")



def _fuzz_module():
    return load_script("bench/fuzz_decode.py")


def test_mutants_are_deterministic_and_cover_every_mutation(tmp_path):
    fuzz = _fuzz_module()
    a = fuzz.make_corpus(str(tmp_path / "a"), 60, seed=3)
    b = fuzz.make_corpus(str(tmp_path / "b"), 60, seed=3)
    assert a == b and len(a) == 60
    assert {m for m, _ in a.values()} == set(fuzz.MUTATIONS)
    for name in a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # The size patchers keep the header valid and declare the new size.
    png = dict((n, d) for n, f, d in fuzz.seed_images(0))["png_gray"]
    assert Image.open(io.BytesIO(fuzz._png_dims(png, 9000, 7000))).size == (9000, 7000)
    bmp = dict((n, d) for n, f, d in fuzz.seed_images(0))["bmp_rgb"]
    assert Image.open(io.BytesIO(fuzz._bmp_dims(bmp, 7000, 5000))).size == (7000, 5000)


def test_small_fuzz_run_has_no_crash_and_loses_nothing(tmp_path, tiny_model_dir):
    fuzz = _fuzz_module()
    corpus = fuzz.make_corpus(str(tmp_path / "corpus"), 100, seed=1)
    result = fuzz.fuzz(str(tmp_path / "corpus"), corpus, tiny_model_dir, str(tmp_path / "out"))
    assert result["problems"] == []
    assert result["templates"] + result["failures"] == 100
    assert sum(result["outcomes"].values()) == 100
    # The corpus does exercise the failure paths, not only clean decodes.
    assert {"ok", "truncated", "corrupt", "not_an_image", "too_large"} <= set(result["outcomes"])
