"""Shards for the tests of beam_pipeline.sources: a TFRecord file of Examples, an object on gs://."""
from __future__ import annotations

from apache_beam.io.filesystems import FileSystems

from beam_pipeline.sources import tfrecord


def write_tfrecord(path, examples) -> str:
    """Write a TFRecord shard at `path` of `examples` (a dict: made into a tf.train.Example; bytes: as is)."""
    with open(path, "wb") as f:
        tfrecord.write_tfrecords(f, [tfrecord.make_example(e) if isinstance(e, dict) else e for e in examples])
    return str(path)


def put(path: str, data: bytes) -> None:
    """Write `data` to `path` on any filesystem Beam knows (the tests' gs:// bucket)."""
    with FileSystems.create(path) as f:
        f.write(data)
