"""beam_pipeline.sources.parquet: Parquet rows as records, read by row group."""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from beam_pipeline.sources import parquet
from beam_pipeline.sources.record import ReadFailure, Record, RecordKeys
from tests.beam_pipeline.sources.shards import put


def test_parquet_row_groups_and_columns(tmp_path):
    path = str(tmp_path / "part-0.parquet")
    table = pa.table({"id": ["a", None, "c", "d", "e"],
                      "image": [b"A", b"B", None, b"D", b"EEEEEE"],
                      "label": ["shoe", "bag", "bag", None, "hat"],
                      "price": [1.0, 2.0, 3.0, 4.0, 5.0]})
    pq.write_table(table, path, row_group_size=2)
    assert parquet.parquet_row_groups(path) == [(0, 0, 2), (1, 2, 2), (2, 4, 1)]
    keys = RecordKeys(label="label")
    got = [r for g, first, _ in parquet.parquet_row_groups(path)
           for r in parquet.parquet_row_group_records(path, "part-0.parquet", g, first, keys, max_bytes=5)]
    assert got == [
        Record("a", f"{path}#0", b"A", "shoe"),
        Record("part-0.parquet#1", f"{path}#1", b"B", "bag"),  # null id: the row number
        ReadFailure("c", f"{path}#2", "ValueError: image column 'image' is null"),
        Record("d", f"{path}#3", b"D", None),
        ReadFailure("e", f"{path}#4", "OSError: image of 6 bytes exceeds --max_file_bytes=5"),
    ]


def test_parquet_struct_image_column_and_errors(tmp_path):
    # Hugging Face datasets write images as struct<bytes: binary, path: string>.
    images = pa.array([{"bytes": b"P1", "path": "a.png"}, {"bytes": b"P2", "path": "b.png"}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    path = str(tmp_path / "hf.parquet")
    pq.write_table(pa.table({"img": images, "n": [1, 2]}), path)
    assert list(parquet.parquet_row_group_records(path, "hf.parquet", 0, 0)) == [
        Record("hf.parquet#0", f"{path}#0", b"P1"), Record("hf.parquet#1", f"{path}#1", b"P2")]
    two = str(tmp_path / "two.parquet")
    pq.write_table(pa.table({"a": [b"1"], "b": [b"2"]}), two)
    [failure] = parquet.parquet_row_group_records(two, "two.parquet", 0, 0)
    assert failure.item_id == "two.parquet#rows@0" and "pass --image_key" in failure.error
    assert list(parquet.parquet_row_group_records(two, "two.parquet", 0, 0, RecordKeys(image="b"))) == [
        Record("two.parquet#0", f"{two}#0", b"2")]
    [failure] = parquet.parquet_row_group_records(two, "two.parquet", 0, 0, RecordKeys(image="b", label="cls"))
    assert "no label column 'cls'" in failure.error


def test_parquet_on_gcs(gcs_bucket):
    """Row groups are read with seeks."""
    base = f"{gcs_bucket}/sources_test"
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": [b"Q%d" % i for i in range(5)], "id": list("abcde")}), buffer,
                   row_group_size=2)
    put(f"{base}/s.parquet", buffer.getvalue())
    assert parquet.parquet_row_groups(f"{base}/s.parquet") == [(0, 0, 2), (1, 2, 2), (2, 4, 1)]
    assert list(parquet.parquet_row_group_records(f"{base}/s.parquet", "s", 1, 2)) == [
        Record("c", f"{base}/s.parquet#2", b"Q2"), Record("d", f"{base}/s.parquet#3", b"Q3")]
