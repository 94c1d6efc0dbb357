"""beam_pipeline.sources: files, TFRecord, Parquet and tar shards as records; every item or a failure."""
from __future__ import annotations

import gzip
import io
import os
import tarfile

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipeline import sources
from beam_pipeline.sources import ReadFailure, Record, RecordKeys


def _tfrecord(path, examples) -> str:
    with open(path, "wb") as f:
        sources.write_tfrecords(f, [sources.make_example(e) if isinstance(e, dict) else e for e in examples])
    return str(path)


def _tar(path, members, mode="w") -> str:
    """Write a tar with `members` [(name, bytes)], in order; a name ending in '/' is a directory."""
    with tarfile.open(path, mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return str(path)


# --------------------------------------------------------------------------------------------- formats


def test_format_of_and_detect_format():
    assert sources.format_of("gs://b/cat/train-00001-of-00010.tfrecord") == "tfrecord"
    assert sources.format_of("cat/x.TFREC") == "tfrecord"
    assert sources.format_of("cat/x.tfrecord.gz") == "tfrecord"
    assert sources.format_of("cat/part-0.parquet") == "parquet"
    assert sources.format_of("cat/shard-000.tar") == "tar"
    assert sources.format_of("cat/shard-000.tar.gz") == "tar"
    assert sources.format_of("cat/shard.tgz") == "tar"
    assert sources.format_of("cat/img.png.gz") == "files"
    assert sources.detect_format(["a/1.png", "a/2.jpg", "a/notes.txt"]) == "files"
    assert sources.detect_format(["a-0.tfrecord", "a-1.tfrecord"]) == "tfrecord"
    with pytest.raises(ValueError, match="mixes catalogue formats.*--input_format"):
        sources.detect_format(["a-0.tfrecord", "b.parquet"])


def test_read_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"12345")
    assert sources.read_file(str(tmp_path / "a.png"), "a.png") == Record("a.png", str(tmp_path / "a.png"), b"12345")
    assert sources.read_file(str(tmp_path / "a.png"), "a.png", max_bytes=4, size=5) == ReadFailure(
        "a.png", str(tmp_path / "a.png"), "OSError: file of 5 bytes exceeds --max_file_bytes=4")
    # A size the listing did not know is enforced on the bytes read.
    assert sources.read_file(str(tmp_path / "a.png"), "a.png", max_bytes=4) == ReadFailure(
        "a.png", str(tmp_path / "a.png"), "OSError: file of more than 4 bytes exceeds --max_file_bytes=4")
    assert sources._read_at_most(__import__("io").BytesIO(b"x" * 10), 7, chunk=3) == b"x" * 7
    missing = sources.read_file(str(tmp_path / "gone.png"), "gone.png")
    assert isinstance(missing, ReadFailure) and missing.item_id == "gone.png"


# -------------------------------------------------------------------------------------------- TFRecord


def test_tfrecord_written_by_tensorflow_is_read(tmp_path):
    tf = pytest.importorskip("tensorflow")

    def feature(value):
        if isinstance(value, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))

    path = str(tmp_path / "shard-0.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(3):
            features = {"image/encoded": feature(b"img%d" % i), "image/class/label": feature(i + 10),
                        "image/format": feature(b"png")}
            if i != 1:
                features["image/id"] = feature(b"sku-%d" % i)
            writer.write(tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())
    records = list(sources.tfrecord_shard_records(path, "shard-0.tfrecord", RecordKeys(label="image/class/label")))
    assert records == [
        Record("sku-0", f"{path}#0", b"img0", "10"),
        Record("shard-0.tfrecord#1", f"{path}#1", b"img1", "11"),  # no id feature: the record's position
        Record("sku-2", f"{path}#2", b"img2", "12"),
    ]
    # Our writer's framing and Examples read back with TensorFlow's own reader.
    ours = str(tmp_path / "ours.tfrecord")
    _tfrecord(ours, [{"image": b"\x89PNG", "id": 7, "score": 0.5}])
    [raw] = [r.numpy() for r in tf.data.TFRecordDataset(ours)]
    example = tf.train.Example.FromString(raw)
    assert example.features.feature["image"].bytes_list.value == [b"\x89PNG"]
    assert example.features.feature["id"].int64_list.value == [7]


def test_parse_example_and_keys():
    record = sources.make_example({"img": b"xyz", "key": "k1", "cls": 3, "w": [0.5, 1.5]})
    assert sources.parse_example(record) == {"img": [b"xyz"], "key": [b"k1"], "cls": [3], "w": [0.5, 1.5]}
    with pytest.raises(ValueError, match="not a tf.train.Example"):
        sources.parse_example(b"\xff\xff\xff\xff")
    keys = RecordKeys()
    assert sources.example_record(record, "s#0", "u#0", keys) == Record("k1", "u#0", b"xyz")
    assert sources.example_record(record, "s#0", "u#0", RecordKeys(image="img", id="cls", label="key")) == Record(
        "3", "u#0", b"xyz", "k1")
    failure = sources.example_record(record, "s#0", "u#0", RecordKeys(image="photo"))
    assert failure.item_id == "k1" and failure.error.startswith("KeyError: \"no image field 'photo'")
    failure = sources.example_record(sources.make_example({"pixels": [1, 2]}), "s#0", "u#0", keys)
    assert failure == ReadFailure("s#0", "u#0", failure.error) and "pass --image_key" in failure.error
    failure = sources.example_record(sources.make_example({"image": [b"a", b"b"]}), "s#0", "u#0", keys)
    assert failure.error == "ValueError: field 'image' holds 2 values, expected 1"
    failure = sources.example_record(sources.make_example({"image": b"abcdef"}), "s#0", "u#0", keys, max_bytes=5)
    assert failure.error == "OSError: image of 6 bytes exceeds --max_file_bytes=5"
    assert sources.example_record(b"\x0a\x03abc", "s#0", "u#0", keys).error.startswith("ValueError")


def test_tfrecord_corruption_keeps_what_came_before(tmp_path):
    examples = [{"image": b"img%d" % i} for i in range(4)]
    path = _tfrecord(tmp_path / "s.tfrecord", examples)
    data = open(path, "rb").read()
    record_size = len(data) // 4
    # A flipped byte inside record 2's data: its CRC fails, records 0 and 1 are kept.
    flipped = bytearray(data)
    flipped[2 * record_size + 14] ^= 0x01
    (tmp_path / "flip.tfrecord").write_bytes(bytes(flipped))
    got = list(sources.tfrecord_shard_records(str(tmp_path / "flip.tfrecord"), "flip.tfrecord"))
    assert [r.item_id for r in got] == ["flip.tfrecord#0", "flip.tfrecord#1", "flip.tfrecord#rest@2"]
    assert got[2].source_uri == f"{tmp_path / 'flip.tfrecord'}#rest@2"
    assert got[2].error == (f"CorruptShardError: record 2 at byte {2 * record_size}: data CRC mismatch; the rest "
                            f"of the shard could not be read")
    # Cut inside record 3.
    (tmp_path / "cut.tfrecord").write_bytes(data[: 3 * record_size + 5])
    got = list(sources.tfrecord_shard_records(str(tmp_path / "cut.tfrecord"), "cut"))
    assert [type(r).__name__ for r in got] == ["Record"] * 3 + ["ReadFailure"]
    assert "stream ends inside the header" in got[3].error and got[3].item_id == "cut#rest@3"
    # Not a TFRecord at all.
    (tmp_path / "text.tfrecord").write_bytes(b"hello, this is text and not a record stream")
    [failure] = sources.tfrecord_shard_records(str(tmp_path / "text.tfrecord"), "text")
    assert failure.item_id == "text#rest@0" and "length CRC mismatch" in failure.error
    # A missing shard.
    [failure] = sources.tfrecord_shard_records(str(tmp_path / "none.tfrecord"), "none")
    assert failure.item_id == "none" and failure.source_uri == str(tmp_path / "none.tfrecord")


def test_gzipped_tfrecord(tmp_path):
    buffer = io.BytesIO()
    sources.write_tfrecords(buffer, [sources.make_example({"image": b"a", "id": "x"})])
    (tmp_path / "s.tfrecord.gz").write_bytes(gzip.compress(buffer.getvalue()))
    assert list(sources.tfrecord_shard_records(str(tmp_path / "s.tfrecord.gz"), "s")) == [
        Record("x", f"{tmp_path / 's.tfrecord.gz'}#0", b"a")]


# --------------------------------------------------------------------------------------------- Parquet


def test_parquet_row_groups_and_columns(tmp_path):
    path = str(tmp_path / "part-0.parquet")
    table = pa.table({"id": ["a", None, "c", "d", "e"],
                      "image": [b"A", b"B", None, b"D", b"EEEEEE"],
                      "label": ["shoe", "bag", "bag", None, "hat"],
                      "price": [1.0, 2.0, 3.0, 4.0, 5.0]})
    pq.write_table(table, path, row_group_size=2)
    assert sources.parquet_row_groups(path) == [(0, 0, 2), (1, 2, 2), (2, 4, 1)]
    keys = RecordKeys(label="label")
    got = [r for g, first, _ in sources.parquet_row_groups(path)
           for r in sources.parquet_row_group_records(path, "part-0.parquet", g, first, keys, max_bytes=5)]
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
    assert list(sources.parquet_row_group_records(path, "hf.parquet", 0, 0)) == [
        Record("hf.parquet#0", f"{path}#0", b"P1"), Record("hf.parquet#1", f"{path}#1", b"P2")]
    two = str(tmp_path / "two.parquet")
    pq.write_table(pa.table({"a": [b"1"], "b": [b"2"]}), two)
    [failure] = sources.parquet_row_group_records(two, "two.parquet", 0, 0)
    assert failure.item_id == "two.parquet#rows@0" and "pass --image_key" in failure.error
    assert list(sources.parquet_row_group_records(two, "two.parquet", 0, 0, RecordKeys(image="b"))) == [
        Record("two.parquet#0", f"{two}#0", b"2")]
    [failure] = sources.parquet_row_group_records(two, "two.parquet", 0, 0, RecordKeys(image="b", label="cls"))
    assert "no label column 'cls'" in failure.error


# ------------------------------------------------------------------------------------------------- tar


def test_tar_members_labels_and_metadata(tmp_path):
    path = _tar(tmp_path / "shard-0.tar", [
        ("train/", b""),
        ("train/0001.jpg", b"J1"), ("train/0001.cls", b"3\n"), ("train/0001.json", b"{}"),
        ("train/0002.cls", b"5"), ("train/0002.png", b"P2"), ("train/0002.mask.png", b"M2"),
        ("0003.webp", b"W3"),
        ("README.txt", b"not an item"),
    ])
    got = list(sources.tar_shard_records(path, "shard-0.tar", RecordKeys(label="cls"), max_bytes=10))
    assert got == [
        Record("shard-0.tar#train/0001.jpg", f"{path}#train/0001.jpg", b"J1", "3"),
        Record("shard-0.tar#train/0002.png", f"{path}#train/0002.png", b"P2", "5"),
        Record("shard-0.tar#train/0002.mask.png", f"{path}#train/0002.mask.png", b"M2", "5"),
        Record("shard-0.tar#0003.webp", f"{path}#0003.webp", b"W3", None),
    ]
    assert sources.webdataset_key("a/b/0001.seg.png") == ("a/b/0001", "seg.png")
    assert sources.webdataset_key("0001") == ("0001", "")
    [too_big] = [r for r in sources.tar_shard_records(path, "s", max_bytes=1) if r.item_id == "s#0003.webp"]
    assert too_big.error == "OSError: member of 2 bytes exceeds --max_file_bytes=1"


def test_tar_gz_and_broken_tars(tmp_path):
    gz = _tar(tmp_path / "s.tar.gz", [("1.png", b"A"), ("2.png", b"B")], mode="w:gz")
    assert [r.data for r in sources.tar_shard_records(gz, "s.tar.gz")] == [b"A", b"B"]
    plain = open(_tar(tmp_path / "p.tar", [("1.png", b"A" * 600), ("2.png", b"B" * 600)]), "rb").read()
    (tmp_path / "cut.tar").write_bytes(plain[:1024 + 700])  # inside member 2's data
    got = list(sources.tar_shard_records(str(tmp_path / "cut.tar"), "cut.tar"))
    assert [r.item_id for r in got] == ["cut.tar#1.png", "cut.tar#rest@1"]
    assert got[1].error.endswith("the rest of the shard could not be read")
    # Cut exactly between members: no end-of-archive marker, so the tail is reported, not dropped.
    (tmp_path / "boundary.tar").write_bytes(plain[:1536])
    got = list(sources.tar_shard_records(str(tmp_path / "boundary.tar"), "b.tar"))
    assert [r.item_id for r in got] == ["b.tar#1.png", "b.tar#rest@1"]
    assert "without its end-of-archive marker" in got[1].error
    (tmp_path / "junk.tar").write_bytes(b"definitely not a tar archive" * 30)
    [failure] = sources.tar_shard_records(str(tmp_path / "junk.tar"), "junk.tar")
    assert failure.item_id == "junk.tar" and failure.error.startswith("ReadError")


# ------------------------------------------------------------------------------------------------ Beam


def test_read_catalogue_counts_every_item(tmp_path):
    """The PTransform on each format: every record or failure once; Parquet split by row group."""
    os.makedirs(tmp_path / "t")
    _tfrecord(tmp_path / "t" / "a.tfrecord", [{"image": b"1", "id": "x"}, {"image": b"2", "id": "y"}])
    (tmp_path / "t" / "b.tfrecord").write_bytes(b"broken shard")
    os.makedirs(tmp_path / "p")
    pq.write_table(pa.table({"image": [b"%d" % i for i in range(7)]}), tmp_path / "p" / "a.parquet",
                   row_group_size=3)
    (tmp_path / "p" / "b.parquet").write_bytes(b"PAR1 but no footer")

    def read(glob, fmt):
        with test_pipeline.TestPipeline() as p:
            records, failures = p | sources.ReadCatalogue(glob, fmt)
            assert_that(records | "R" >> beam.Map(lambda r: (r.item_id, r.data)), equal_to(expected_records),
                        label="records")
            assert_that(failures | "F" >> beam.Map(lambda f: f.item_id), equal_to(expected_failures),
                        label="failures")
        return p

    expected_records = [("x", b"1"), ("y", b"2")]
    expected_failures = ["b.tfrecord#rest@0"]
    read(str(tmp_path / "t" / "*.tfrecord"), "tfrecord")
    expected_records = [(f"a.parquet#{i}", b"%d" % i) for i in range(7)]
    expected_failures = ["b.parquet"]
    read(str(tmp_path / "p" / "*"), "parquet")
    with pytest.raises(ValueError, match="input_format"):
        sources.ReadCatalogue("x", "zip")


def test_shards_on_gcs(gcs_bucket):
    """The same readers on gs:// (Parquet row groups are read with seeks, tar as a stream)."""
    base = f"{gcs_bucket}/sources_test"

    def put(path, data):
        with FileSystems.create(path) as f:
            f.write(data)

    buffer = io.BytesIO()
    sources.write_tfrecords(buffer, [sources.make_example({"image": b"T%d" % i}) for i in range(3)])
    put(f"{base}/s.tfrecord", buffer.getvalue())
    assert [r.data for r in sources.tfrecord_shard_records(f"{base}/s.tfrecord", "s")] == [b"T0", b"T1", b"T2"]

    buffer = io.BytesIO()
    pq.write_table(pa.table({"image": [b"Q%d" % i for i in range(5)], "id": list("abcde")}), buffer,
                   row_group_size=2)
    put(f"{base}/s.parquet", buffer.getvalue())
    assert sources.parquet_row_groups(f"{base}/s.parquet") == [(0, 0, 2), (1, 2, 2), (2, 4, 1)]
    assert list(sources.parquet_row_group_records(f"{base}/s.parquet", "s", 1, 2)) == [
        Record("c", f"{base}/s.parquet#2", b"Q2"), Record("d", f"{base}/s.parquet#3", b"Q3")]

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in [("k1.png", b"P1"), ("k1.cls", b"4")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    put(f"{base}/s.tar", buffer.getvalue())
    assert list(sources.tar_shard_records(f"{base}/s.tar", "s.tar", RecordKeys(label="cls"))) == [
        Record("s.tar#k1.png", f"{base}/s.tar#k1.png", b"P1", "4")]


@pytest.mark.parametrize("fmt, reader, spread", [
    ("files", "ReadFiles", "SpreadFiles"), ("tfrecord", "ReadShards", "SpreadFiles"),
    ("tar", "ReadShards", "SpreadFiles"), ("parquet", "ReadRowGroups", "SpreadRowGroups")])
def test_reads_are_spread_before_any_file_is_opened(fmt, reader, spread):
    """The ParDo that opens files (or row groups) reads a Reshuffle's output, never MatchFiles' directly:
    the listing comes from one worker, and a fused read would stay there."""
    p = beam.Pipeline()
    _ = p | "Read" >> sources.ReadCatalogue("/nowhere/*", fmt)
    proto = p.to_runner_api()
    transforms = proto.components.transforms
    by_name = {t.unique_name: t for t in transforms.values()}
    producer = {pc: t.unique_name for t in transforms.values() if not t.subtransforms for pc in t.outputs.values()}
    [read_input] = by_name[f"Read/{reader}"].inputs.values()
    assert producer[read_input].startswith(f"Read/{spread}/"), producer[read_input]
    # ... and the Reshuffle really shuffles (a GroupByKey inside).
    assert any(n.endswith("/GroupByKey") for n in _descendants(transforms, by_name[f"Read/{spread}"]))


def _descendants(transforms, transform) -> list[str]:
    names = []
    for sub in transform.subtransforms:
        names.append(transforms[sub].unique_name)
        names.extend(_descendants(transforms, transforms[sub]))
    return names
