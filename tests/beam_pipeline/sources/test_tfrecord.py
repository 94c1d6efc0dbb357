"""beam_pipeline.sources.tfrecord: TFRecord shards of tf.train.Example as records; a broken shard keeps what came before."""
from __future__ import annotations

import gzip
import io

import pytest

from beam_pipeline.sources import tfrecord
from beam_pipeline.sources.record import ReadFailure, Record, RecordKeys
from tests.beam_pipeline.sources.shards import put, write_tfrecord


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
    records = list(tfrecord.tfrecord_shard_records(path, "shard-0.tfrecord", RecordKeys(label="image/class/label")))
    assert records == [
        Record("sku-0", f"{path}#0", b"img0", "10"),
        Record("shard-0.tfrecord#1", f"{path}#1", b"img1", "11"),  # no id feature: the record's position
        Record("sku-2", f"{path}#2", b"img2", "12"),
    ]
    # Our writer's framing and Examples read back with TensorFlow's own reader.
    ours = str(tmp_path / "ours.tfrecord")
    write_tfrecord(ours, [{"image": b"\x89PNG", "id": 7, "score": 0.5}])
    [raw] = [r.numpy() for r in tf.data.TFRecordDataset(ours)]
    example = tf.train.Example.FromString(raw)
    assert example.features.feature["image"].bytes_list.value == [b"\x89PNG"]
    assert example.features.feature["id"].int64_list.value == [7]


def test_parse_example_and_keys():
    record = tfrecord.make_example({"img": b"xyz", "key": "k1", "cls": 3, "w": [0.5, 1.5]})
    assert tfrecord.parse_example(record) == {"img": [b"xyz"], "key": [b"k1"], "cls": [3], "w": [0.5, 1.5]}
    with pytest.raises(ValueError, match="not a tf.train.Example"):
        tfrecord.parse_example(b"\xff\xff\xff\xff")
    keys = RecordKeys()
    assert tfrecord.example_record(record, "s#0", "u#0", keys) == Record("k1", "u#0", b"xyz")
    assert tfrecord.example_record(record, "s#0", "u#0", RecordKeys(image="img", id="cls", label="key")) == Record(
        "3", "u#0", b"xyz", "k1")
    failure = tfrecord.example_record(record, "s#0", "u#0", RecordKeys(image="photo"))
    assert failure.item_id == "k1" and failure.error.startswith("KeyError: \"no image field 'photo'")
    failure = tfrecord.example_record(tfrecord.make_example({"pixels": [1, 2]}), "s#0", "u#0", keys)
    assert failure == ReadFailure("s#0", "u#0", failure.error) and "pass --image_key" in failure.error
    failure = tfrecord.example_record(tfrecord.make_example({"image": [b"a", b"b"]}), "s#0", "u#0", keys)
    assert failure.error == "ValueError: field 'image' holds 2 values, expected 1"
    failure = tfrecord.example_record(tfrecord.make_example({"image": b"abcdef"}), "s#0", "u#0", keys, max_bytes=5)
    assert failure.error == "OSError: image of 6 bytes exceeds --max_file_bytes=5"
    assert tfrecord.example_record(b"\x0a\x03abc", "s#0", "u#0", keys).error.startswith("ValueError")


def test_tfrecord_corruption_keeps_what_came_before(tmp_path):
    examples = [{"image": b"img%d" % i} for i in range(4)]
    path = write_tfrecord(tmp_path / "s.tfrecord", examples)
    data = open(path, "rb").read()
    record_size = len(data) // 4
    # A flipped byte inside record 2's data: its CRC fails, records 0 and 1 are kept.
    flipped = bytearray(data)
    flipped[2 * record_size + 14] ^= 0x01
    (tmp_path / "flip.tfrecord").write_bytes(bytes(flipped))
    got = list(tfrecord.tfrecord_shard_records(str(tmp_path / "flip.tfrecord"), "flip.tfrecord"))
    assert [r.item_id for r in got] == ["flip.tfrecord#0", "flip.tfrecord#1", "flip.tfrecord#rest@2"]
    assert got[2].source_uri == f"{tmp_path / 'flip.tfrecord'}#rest@2"
    assert got[2].error == (f"CorruptShardError: record 2 at byte {2 * record_size}: data CRC mismatch; the rest "
                            f"of the shard could not be read")
    # Cut inside record 3.
    (tmp_path / "cut.tfrecord").write_bytes(data[: 3 * record_size + 5])
    got = list(tfrecord.tfrecord_shard_records(str(tmp_path / "cut.tfrecord"), "cut"))
    assert [type(r).__name__ for r in got] == ["Record"] * 3 + ["ReadFailure"]
    assert "stream ends inside the header" in got[3].error and got[3].item_id == "cut#rest@3"
    # Not a TFRecord at all.
    (tmp_path / "text.tfrecord").write_bytes(b"hello, this is text and not a record stream")
    [failure] = tfrecord.tfrecord_shard_records(str(tmp_path / "text.tfrecord"), "text")
    assert failure.item_id == "text#rest@0" and "length CRC mismatch" in failure.error
    # A missing shard.
    [failure] = tfrecord.tfrecord_shard_records(str(tmp_path / "none.tfrecord"), "none")
    assert failure.item_id == "none" and failure.source_uri == str(tmp_path / "none.tfrecord")


def test_gzipped_tfrecord(tmp_path):
    buffer = io.BytesIO()
    tfrecord.write_tfrecords(buffer, [tfrecord.make_example({"image": b"a", "id": "x"})])
    (tmp_path / "s.tfrecord.gz").write_bytes(gzip.compress(buffer.getvalue()))
    assert list(tfrecord.tfrecord_shard_records(str(tmp_path / "s.tfrecord.gz"), "s")) == [
        Record("x", f"{tmp_path / 's.tfrecord.gz'}#0", b"a")]


def test_tfrecord_shard_on_gcs(gcs_bucket):
    """The same reader on gs://."""
    base = f"{gcs_bucket}/sources_test"
    buffer = io.BytesIO()
    tfrecord.write_tfrecords(buffer, [tfrecord.make_example({"image": b"T%d" % i}) for i in range(3)])
    put(f"{base}/s.tfrecord", buffer.getvalue())
    assert [r.data for r in tfrecord.tfrecord_shard_records(f"{base}/s.tfrecord", "s")] == [b"T0", b"T1", b"T2"]
