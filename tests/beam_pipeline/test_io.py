"""beam_pipeline.io: item ids, Parquet table writing/reading with exact schemas, JSON documents."""
from __future__ import annotations

import datetime
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline

from beam_pipeline.io import (
    WriteTable,
    conform_table,
    glob_prefix,
    item_id_for,
    match_paths,
    read_json,
    read_parquet_table,
    read_table_dir,
    table_glob,
    write_json,
)
from schemas.tables import FAILURES_SCHEMA, SchemaError, embeddings_as_numpy, templates_schema

UTC = datetime.timezone.utc


# --------------------------------------------------------------------------------------------- item ids


@pytest.mark.parametrize(
    "glob, prefix",
    [
        ("cat/images/*.png", "cat/images/"),
        ("cat/**/*.png", "cat/"),
        ("gs://bucket/cat/shard-?/*.jpg", "gs://bucket/cat/"),
        ("cat/[ab]*/x.png", "cat/"),
        ("cat/x.png", "cat/"),
        ("*.png", ""),
    ],
)
def test_glob_prefix(glob, prefix):
    assert glob_prefix(glob) == prefix


def test_item_ids_are_relative_to_the_glob_prefix(tmp_path, monkeypatch):
    assert item_id_for("cat/images/item_000123.png", "cat/images/*.png") == "item_000123.png"
    assert item_id_for("cat/shoes/a/1.png", "cat/**/*.png") == "shoes/a/1.png"
    assert item_id_for("gs://b/cat/shoes/1.png", "gs://b/cat/**") == "shoes/1.png"
    assert item_id_for("gs://b/cat/1.png", "gs://b/cat/*.png") == "1.png"
    # Relative glob, absolute match result (and the reverse) give the same id.
    monkeypatch.chdir(tmp_path)
    assert item_id_for(str(tmp_path / "cat" / "x" / "1.png"), "cat/*/*.png") == "x/1.png"
    assert item_id_for("cat/x/1.png", str(tmp_path / "cat" / "*" / "*.png")) == "x/1.png"
    assert item_id_for("1.png", "*.png") == "1.png"


def test_item_id_outside_the_prefix_is_refused():
    with pytest.raises(ValueError, match="does not lie under"):
        item_id_for("/data/other/1.png", "/data/cat/*.png")
    with pytest.raises(ValueError, match="does not lie under"):
        item_id_for("gs://b/other/1.png", "gs://b/cat/*.png")


# ----------------------------------------------------------------------------------------------- tables


def _template_rows(n: int, dim: int = 4) -> list[dict]:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    stamp = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    return [
        {"item_id": f"item_{i}.png", "source_uri": f"/cat/item_{i}.png", "content_sha256": f"{i:064x}",
         "embedding": vectors[i], "model_id": "0123456789abcdef", "width": 28 + i, "height": 30,
         "embedded_at": stamp + datetime.timedelta(seconds=i), "run_id": "run-1"}
        for i in range(n)
    ]


def test_write_table_round_trip_keeps_types_and_values(tmp_path):
    dim = 4
    schema = templates_schema(dim)
    rows = _template_rows(7, dim)
    # Mixed element kinds: dict rows, a Table (with list<float64> embeddings and columns out of order) and
    # a RecordBatch.
    loose = pa.table({
        "run_id": ["run-1"],
        **{k: [v] for k, v in rows[5].items() if k not in ("embedding", "run_id")},
        "embedding": [rows[5]["embedding"].astype(np.float64).tolist()],
    })
    batch = pa.RecordBatch.from_pylist([rows[6]], schema=schema)
    with test_pipeline.TestPipeline() as p:
        _ = (p | beam.Create(rows[:5] + [loose, batch], reshuffle=False)
             | WriteTable(str(tmp_path), "templates", schema))

    files = match_paths(table_glob(str(tmp_path), "templates"))
    assert len(files) == 1 and os.path.basename(files[0]) == "templates-00000-of-00001.parquet"
    on_disk = pq.read_schema(files[0])
    assert on_disk.field("embedding").type == pa.list_(pa.float32(), dim)
    assert on_disk.field("embedded_at").type == pa.timestamp("us", tz="UTC")

    table = read_table_dir(str(tmp_path), "templates", dim)
    assert table.schema.equals(schema)
    table = table.sort_by("item_id")
    np.testing.assert_array_equal(embeddings_as_numpy(table), np.stack([r["embedding"] for r in rows]))
    assert table.column("embedded_at").to_pylist() == [r["embedded_at"] for r in rows]
    assert table.column("width").to_pylist() == [28 + i for i in range(7)]


def test_empty_collection_still_writes_a_readable_table(tmp_path):
    with test_pipeline.TestPipeline() as p:
        _ = p | beam.Create([]) | WriteTable(str(tmp_path), "failures", FAILURES_SCHEMA)
    table = read_table_dir(str(tmp_path), "failures")
    assert table.num_rows == 0 and table.schema.equals(FAILURES_SCHEMA)


def test_num_shards(tmp_path):
    rows = [{"item_id": f"i{k}", "source_uri": "u", "stage": "read", "error": "e", "run_id": "r"}
            for k in range(20)]
    with test_pipeline.TestPipeline() as p:
        _ = p | beam.Create(rows) | WriteTable(str(tmp_path), "failures", FAILURES_SCHEMA, num_shards=3)
    assert [os.path.basename(f) for f in match_paths(table_glob(str(tmp_path), "failures"))] == [
        f"failures-0000{k}-of-00003.parquet" for k in range(3)]
    assert sorted(read_table_dir(str(tmp_path), "failures").column("item_id").to_pylist()) == sorted(
        r["item_id"] for r in rows)


def test_read_parquet_table_concatenates_shards_and_validates(tmp_path):
    rows = [{"item_id": f"i{k}", "source_uri": "u", "stage": "decode", "error": "e", "run_id": "r"}
            for k in range(5)]
    (tmp_path / "f").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:2], schema=FAILURES_SCHEMA), tmp_path / "f" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:], schema=FAILURES_SCHEMA), tmp_path / "f" / "b.parquet")
    table = read_parquet_table(str(tmp_path / "f" / "*.parquet"), "failures")
    assert table.column("item_id").to_pylist() == ["i0", "i1", "i2", "i3", "i4"]

    bad = pa.Table.from_pylist([dict(rows[0], stage="upload")], schema=FAILURES_SCHEMA)
    pq.write_table(bad, tmp_path / "f" / "c.parquet")
    with pytest.raises(SchemaError, match="stage"):
        read_parquet_table(str(tmp_path / "f" / "*.parquet"), "failures")


def test_read_parquet_table_refuses_wrong_types_and_missing_files(tmp_path):
    table = pa.table({"item_id": ["a"], "source_uri": ["u"], "stage": ["read"], "error": ["e"], "run_id": [1]})
    pq.write_table(table, tmp_path / "failures-0.parquet")
    with pytest.raises(SchemaError, match="run_id"):
        read_parquet_table(str(tmp_path / "failures-*.parquet"), "failures")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        read_parquet_table(str(tmp_path / "nothing-here" / "*.parquet"), "templates")


def test_conform_table():
    schema = templates_schema(2)
    rows = _template_rows(1, 2)
    loose = pa.table({k: [v.tolist() if k == "embedding" else v] for k, v in rows[0].items()})
    assert conform_table(loose, schema).schema.equals(schema)
    with pytest.raises(KeyError, match="embedding"):
        conform_table(loose.drop_columns(["embedding"]), schema)


# ------------------------------------------------------------------------------------------------- JSON


def test_json_round_trip_makes_parent_dirs(tmp_path):
    path = str(tmp_path / "a" / "b" / "doc.json")
    doc = {"run_id": "r", "threshold": {"cosine": 0.5}, "items": 3, "names": ["x", "y"]}
    assert write_json(path, doc) == path
    assert read_json(path) == doc
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(str(tmp_path / "missing.json"))


# ------------------------------------------------------------------------------------------------ gs://


def test_the_same_helpers_work_on_gcs(gcs_bucket):
    base = f"{gcs_bucket}/io_test"
    doc = {"model_id": "0123456789abcdef", "pairs": 3}
    write_json(f"{base}/match_run.json", doc)
    assert read_json(f"{base}/match_run.json") == doc

    dim = 3
    rows = _template_rows(4, dim)
    with test_pipeline.TestPipeline() as p:
        _ = p | beam.Create(rows) | WriteTable(base, "templates", templates_schema(dim))
    assert match_paths(table_glob(base, "templates")) == [f"{base}/templates/templates-00000-of-00001.parquet"]
    table = read_table_dir(base, "templates", dim).sort_by("item_id")
    assert table.column("item_id").to_pylist() == [r["item_id"] for r in rows]
    np.testing.assert_array_equal(embeddings_as_numpy(table), np.stack([r["embedding"] for r in rows]))
    with pytest.raises(FileNotFoundError, match="no failures Parquet files"):
        read_table_dir(base, "failures")


def test_match_paths_limit(tmp_path):
    for k in range(5):
        (tmp_path / f"f{k}.png").write_bytes(b"x")
    glob = str(tmp_path / "*.png")
    everything = match_paths(glob)
    assert len(everything) == 5 and everything == sorted(everything)
    some = match_paths(glob, limit=2)
    assert len(some) == 2 and set(some) <= set(everything)
    assert match_paths(str(tmp_path / "*.jpg"), limit=2) == []
