"""beam_pipeline.sources.catalogue: the formats a path implies, and ReadCatalogue on each format: every item
or a failure."""
from __future__ import annotations

import os

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipeline.sources import catalogue
from tests.beam_pipeline.sources.shards import write_tfrecord


def test_format_of_and_detect_format():
    assert catalogue.format_of("gs://b/cat/train-00001-of-00010.tfrecord") == "tfrecord"
    assert catalogue.format_of("cat/x.TFREC") == "tfrecord"
    assert catalogue.format_of("cat/x.tfrecord.gz") == "tfrecord"
    assert catalogue.format_of("cat/part-0.parquet") == "parquet"
    assert catalogue.format_of("cat/shard-000.tar") == "tar"
    assert catalogue.format_of("cat/shard-000.tar.gz") == "tar"
    assert catalogue.format_of("cat/shard.tgz") == "tar"
    assert catalogue.format_of("cat/img.png.gz") == "files"
    assert catalogue.detect_format(["a/1.png", "a/2.jpg", "a/notes.txt"]) == "files"
    assert catalogue.detect_format(["a-0.tfrecord", "a-1.tfrecord"]) == "tfrecord"
    with pytest.raises(ValueError, match="mixes catalogue formats.*--input_format"):
        catalogue.detect_format(["a-0.tfrecord", "b.parquet"])


def test_read_catalogue_counts_every_item(tmp_path):
    """The PTransform on each format: every record or failure once; Parquet split by row group."""
    os.makedirs(tmp_path / "t")
    write_tfrecord(tmp_path / "t" / "a.tfrecord", [{"image": b"1", "id": "x"}, {"image": b"2", "id": "y"}])
    (tmp_path / "t" / "b.tfrecord").write_bytes(b"broken shard")
    os.makedirs(tmp_path / "p")
    pq.write_table(pa.table({"image": [b"%d" % i for i in range(7)]}), tmp_path / "p" / "a.parquet",
                   row_group_size=3)
    (tmp_path / "p" / "b.parquet").write_bytes(b"PAR1 but no footer")

    def read(glob, fmt):
        with test_pipeline.TestPipeline() as p:
            records, failures = p | catalogue.ReadCatalogue(glob, fmt)
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
        catalogue.ReadCatalogue("x", "zip")


@pytest.mark.parametrize("fmt, reader, spread", [
    ("files", "ReadFiles", "SpreadFiles"), ("tfrecord", "ReadShards", "SpreadFiles"),
    ("tar", "ReadShards", "SpreadFiles"), ("parquet", "ReadRowGroups", "SpreadRowGroups")])
def test_reads_are_spread_before_any_file_is_opened(fmt, reader, spread):
    """The ParDo that opens files (or row groups) reads a Reshuffle's output, never MatchFiles' directly:
    the listing comes from one worker, and a fused read would stay there."""
    p = beam.Pipeline()
    _ = p | "Read" >> catalogue.ReadCatalogue("/nowhere/*", fmt)
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
