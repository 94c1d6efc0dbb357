"""TFRecord shards of serialized `tf.train.Example`s: one item a record.

A record holds the image bytes (a bytes feature), an optional id (bytes or int64 feature) and an optional
label. Shards are uncompressed, or gzip with a `.gz` suffix; the framing CRCs are checked. item_id = the id
feature when the record has one, else `<shard id>#<index of the record in the shard>`; source_uri =
`<shard path>#<index>`. A shard is read front to back by one worker: when it breaks (cut short, a CRC
that does not match) nothing after the break can be found, so the records before it are kept and the rest
becomes one failure, `<shard id>#rest@<index>`, that says where it broke.

The framing and the Example message are TFRecord's own: Beam's masked CRC32C and record writer
(`apache_beam.io.tfrecordio`), TensorFlow's `tf.train.Example`.
"""
from __future__ import annotations

import struct
from typing import IO, Iterable, Iterator, Optional, Union

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.tfrecordio import _TFRecordUtil

from beam_pipeline.sources.record import (ID_KEYS, IMAGE_KEYS, ReadFailure, Record, RecordKeys, as_text, describe,
                                          open_stream, pick, too_big)

SUFFIXES = (".tfrecord", ".tfrecords", ".tfrec", ".tfrecord.gz", ".tfrecords.gz", ".tfrec.gz")


class CorruptShardError(IOError):
    """A shard broke at `position` (record index): what follows cannot be read."""

    def __init__(self, position: int, message: str):
        self.position = position
        super().__init__(message)


def iter_tfrecords(stream: IO[bytes], verify: bool = True) -> Iterator[bytes]:
    """The records of a TFRecord stream, in order.

    Framing: uint64 length, uint32 masked CRC32C of the length, the data, uint32 masked CRC32C of the data.
    Raises CorruptShardError(index of the first unreadable record) when the stream is cut short or a CRC
    does not match (`verify`): without a valid length nothing after it can be found.

    Not Beam's `_TFRecordUtil.read_record`: its errors say neither which record nor at which byte the
    shard broke (the failures row's message does), and they hex-dump the whole record (400 MB of text for
    a 200 MB record). The CRC is Beam's.
    """
    crc = _TFRecordUtil._masked_crc32c
    index = 0
    offset = 0
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            raise CorruptShardError(index, f"record {index} at byte {offset}: stream ends inside the header")
        length, length_crc = struct.unpack("<QI", header)
        if verify and crc(header[:8]) != length_crc:
            raise CorruptShardError(index, f"record {index} at byte {offset}: length CRC mismatch")
        data = stream.read(length)
        footer = stream.read(4)
        if len(data) < length or len(footer) < 4:
            raise CorruptShardError(index, f"record {index} at byte {offset}: stream ends inside the record "
                                           f"({len(data)} of {length} bytes)")
        if verify and crc(data) != struct.unpack("<I", footer)[0]:
            raise CorruptShardError(index, f"record {index} at byte {offset}: data CRC mismatch")
        yield data
        index += 1
        offset += 16 + length


def write_tfrecords(stream: IO[bytes], records: Iterable[bytes]) -> None:
    """Write `records` to `stream` in TFRecord framing (the inverse of `iter_tfrecords`)."""
    for data in records:
        _TFRecordUtil.write_record(stream, data)


def _example_class():
    """tf.train.Example. TensorFlow is imported only here, when a shard's first record is parsed: the
    workers that read TFRecord shards (embed's Read) import it anyway to run the encoder, and the light
    paths (listing, image files, report thumbnails) never come here."""
    import tensorflow as tf

    return tf.train.Example


def parse_example(record: bytes) -> dict[str, list]:
    """The features of a serialized tf.train.Example: {name: list of bytes | float | int}.

    Raises ValueError if `record` is not an Example.
    """
    from google.protobuf.message import DecodeError

    try:
        example = _example_class().FromString(record)
    except DecodeError as err:
        raise ValueError(f"not a tf.train.Example: {err}") from None
    features = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        features[name] = list(getattr(feature, kind).value) if kind else []
    return features


def make_example(features: dict) -> bytes:
    """A serialized tf.train.Example from {name: bytes | str | int | float | list of one kind}."""
    example = _example_class()()
    for name, value in features.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        values = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
        feature = example.features.feature[name]
        if all(isinstance(v, bytes) for v in values):
            feature.bytes_list.value.extend(values)
        elif all(isinstance(v, int) for v in values):
            feature.int64_list.value.extend(values)
        else:
            feature.float_list.value.extend(float(v) for v in values)
    return example.SerializeToString()


def _single(values: list, name: str):
    if len(values) != 1:
        raise ValueError(f"field {name!r} holds {len(values)} values, expected 1")
    return values[0]


def example_record(record: bytes, default_id: str, source_uri: str, keys: RecordKeys,
                   max_bytes: int = 0) -> Union[Record, ReadFailure]:
    """A serialized tf.train.Example -> Record (image bytes, id, label), or ReadFailure saying why not.

    The image is the bytes feature `keys.image` (default: the first of IMAGE_KEYS present), the id the
    feature `keys.id` (default: the first of ID_KEYS present, else `default_id`), the label the feature
    `keys.label` (only when given).
    """
    item_id = default_id
    try:
        features = parse_example(record)
        id_key = pick(features, keys.id, ID_KEYS, "id")
        if id_key is not None:
            item_id = as_text(_single(features[id_key], id_key))
        image_key = pick(features, keys.image, IMAGE_KEYS, "image")
        if image_key is None:
            raise KeyError(f"no image field (tried {', '.join(IMAGE_KEYS)}; fields: {sorted(features)[:20]}); "
                           f"pass --image_key")
        data = _single(features[image_key], image_key)
        if not isinstance(data, bytes):
            raise TypeError(f"image field {image_key!r} holds {type(data).__name__}, not bytes")
        label: Optional[str] = None
        if keys.label is not None:
            label = as_text(_single(features[pick(features, keys.label, (), "label")], keys.label))
    except (ValueError, KeyError, TypeError) as err:
        return ReadFailure(item_id, source_uri, describe(err))
    over = too_big(len(data), max_bytes, "image")
    if over:
        return ReadFailure(item_id, source_uri, over)
    return Record(item_id, source_uri, data, label)


def tfrecord_shard_records(path: str, shard_id: str, keys: RecordKeys = RecordKeys(),
                           max_bytes: int = 0) -> Iterator[Union[Record, ReadFailure]]:
    """Every record of the TFRecord shard at `path` as a Record or ReadFailure, in order (see module doc)."""
    compression = CompressionTypes.GZIP if path.lower().endswith(".gz") else CompressionTypes.UNCOMPRESSED
    index = 0
    try:
        with open_stream(path, compression) as f:
            for index, record in enumerate(iter_tfrecords(f)):
                yield example_record(record, f"{shard_id}#{index}", f"{path}#{index}", keys, max_bytes)
    except CorruptShardError as err:
        yield ReadFailure(f"{shard_id}#rest@{err.position}", f"{path}#rest@{err.position}",
                          f"CorruptShardError: {err}; the rest of the shard could not be read")
    except Exception as err:  # the shard cannot be opened or the stream fails (gzip, filesystem)
        position = index + 1 if index else 0
        yield ReadFailure(f"{shard_id}#rest@{position}" if position else shard_id,
                          f"{path}#rest@{position}" if position else path, describe(err))
