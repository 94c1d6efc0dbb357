"""beam_pipeline.sources.files: an image file as a record, within the size limit."""
from __future__ import annotations

import io

from beam_pipeline.sources import files
from beam_pipeline.sources.record import ReadFailure, Record


def test_read_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"12345")
    assert files.read_file(str(tmp_path / "a.png"), "a.png") == Record("a.png", str(tmp_path / "a.png"), b"12345")
    assert files.read_file(str(tmp_path / "a.png"), "a.png", max_bytes=4, size=5) == ReadFailure(
        "a.png", str(tmp_path / "a.png"), "OSError: file of 5 bytes exceeds --max_file_bytes=4")
    # A size the listing did not know is enforced on the bytes read.
    assert files.read_file(str(tmp_path / "a.png"), "a.png", max_bytes=4) == ReadFailure(
        "a.png", str(tmp_path / "a.png"), "OSError: file of more than 4 bytes exceeds --max_file_bytes=4")
    assert files._read_at_most(io.BytesIO(b"x" * 10), 7, chunk=3) == b"x" * 7
    missing = files.read_file(str(tmp_path / "gone.png"), "gone.png")
    assert isinstance(missing, ReadFailure) and missing.item_id == "gone.png"
