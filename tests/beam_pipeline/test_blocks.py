"""Staging templates into blocks: streamed across files, refusals before any matching, rows read back."""
import numpy as np
import pytest

from beam_pipeline import blocks
from tests.beam_pipeline.test_match import write_templates
from siamese_core.similarity import l2_normalize


def _vectors(n, d, seed=0):
    return l2_normalize(np.random.default_rng(seed).standard_normal((n, d)))


def test_blocks_cross_file_boundaries_and_rows_read_back(tmp_path):
    x = _vectors(7, 4)
    write_templates(str(tmp_path / "t" / "a.parquet"), {f"i{k}": x[k] for k in range(3)})
    write_templates(str(tmp_path / "t" / "b.parquet"), {f"i{k}": x[k] for k in range(3, 7)})
    m = blocks.stage_templates(str(tmp_path / "t" / "*.parquet"), str(tmp_path / "s"), 2)
    assert (m.n, m.dim, m.block_rows, m.model_id) == (7, 4, [2, 2, 2, 1], "0123456789abcdef")
    ids, emb = blocks.read_block(m, 1)  # rows 2 (file a) and 3 (file b)
    assert ids.to_pylist() == ["i2", "i3"]
    np.testing.assert_array_equal(emb, x[2:4])
    got_ids, got = blocks.read_rows(m, np.array([6, 0, 3]))
    assert got_ids == ["i6", "i0", "i3"]
    np.testing.assert_array_equal(got, x[[6, 0, 3]])
    assert blocks.all_item_ids(m).to_pylist() == [f"i{k}" for k in range(7)]
    blocks.delete_staging(str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_duplicates_across_files_are_refused_and_nothing_is_left(tmp_path):
    x = _vectors(3, 4)
    write_templates(str(tmp_path / "t" / "a.parquet"), {"p": x[0], "q": x[1]})
    write_templates(str(tmp_path / "t" / "b.parquet"), {"q": x[2]})
    with pytest.raises(ValueError, match="duplicate item_id 'q'"):
        blocks.stage_templates(str(tmp_path / "t" / "*.parquet"), str(tmp_path / "s"), 1)
    assert not (tmp_path / "s").exists()
    with pytest.raises(FileNotFoundError, match="no templates Parquet files"):
        blocks.stage_templates(str(tmp_path / "none" / "*.parquet"), str(tmp_path / "s"), 1)
