"""Shard readers: every kind of catalogue the embed pipeline takes, turned into image records.

A catalogue is a glob (local or gs://, through Beam's FileSystems) of one of:

- `files`: image files, one item each (JPEG, PNG, WebP, BMP, GIF, TIFF, ...). item_id = the path relative
  to the glob's prefix (`beam_pipeline.io.item_id_for`); source_uri = the path.
- `tfrecord`: TFRecord shards of serialized `tf.train.Example`, one item a record: image bytes (a bytes
  feature), an optional id (bytes or int64 feature) and an optional label. Uncompressed, or gzip with a
  `.gz` suffix. Record framing CRCs are checked.
- `parquet`: Parquet files with a binary image column (or a struct column with a `bytes` field, as
  Hugging Face `datasets` writes images), an optional id column and an optional label column.
- `tar`: tar shards (plain, .tar.gz / .tgz), WebDataset-style: one image member per item; members that
  share the image's key (its path up to the first '.' of the file name) carry metadata, e.g.
  `000123.jpg` + `000123.cls` (the label, with `--label_key cls`). Members that are not images
  (by extension) are metadata, not items.

In the record formats, item_id = the id field when the shard has one, else `<shard id>#<position>`
(`<shard id>#<member name>` for tar), where `<shard id>` is the shard's path relative to the glob's
prefix and the position is the record's index in the TFRecord shard or its row number in the Parquet
file: stable as long as the shard is. source_uri = `<shard path>#<position or member name>` (a member
name's repeats in one tar: `<name>@<n>`), unique per input record even when ids repeat (the embed
pipeline refuses repeated ids at its validate stage).

Work is split across workers by file (files), by shard (TFRecord, tar: a shard is read sequentially by
one worker; catalogues come as many shards) and by row group (Parquet). Everything that cannot be read
becomes a `ReadFailure`: a file, record or member over the size limit, a record whose CRC does not match,
a member without bytes. When a shard breaks in the middle (a cut or corrupted TFRecord, a broken tar
stream) the records after the break cannot be enumerated: the rest of the shard becomes one failure whose
item_id is `<shard id>#rest@<position>` and whose message says where it broke; the records before it are
kept. An unreadable shard is one failure with the shard's id.

The pure readers (`tfrecord_shard_records`, `parquet_row_group_records`, `tar_shard_records`, ...) need
no Beam pipeline and no TensorFlow; `ReadCatalogue` is the thin PTransform the embed pipeline applies.
"""
from __future__ import annotations

import dataclasses
import errno
import fnmatch
import glob as glob_module
import os
import posixpath
import stat
import struct
import tarfile
import typing
from typing import IO, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline import io as bio

METRICS_NAMESPACE = "embed"
FAILURES_TAG = "failures"

FORMATS = ("files", "tfrecord", "parquet", "tar")
# The largest file, record or member read (embed's --max_file_bytes default; the report's thumbnails).
DEFAULT_MAX_FILE_BYTES = 200_000_000
# Image files travel to the readers in groups of this many (one shuffle element each).
FILES_PER_READ = 16
IMAGE_EXTENSIONS = ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "dib", "gif", "tif", "tiff", "ppm",
                    "pgm", "pbm", "pnm")
_FORMAT_SUFFIXES = (
    ("tfrecord", (".tfrecord", ".tfrecords", ".tfrec", ".tfrecord.gz", ".tfrecords.gz", ".tfrec.gz")),
    ("parquet", (".parquet", ".pq")),
    ("tar", (".tar", ".tar.gz", ".tgz")),
)
# Field names tried, in order, when --image_key / --id_key is not given.
IMAGE_KEYS = ("image/encoded", "image", "image_bytes", "img", "jpg", "jpeg", "png", "webp", "bytes", "content")
ID_KEYS = ("id", "item_id", "image/id", "image/source_id", "key", "__key__")


class Record(NamedTuple):
    """One item of a catalogue: its bytes and where they came from. `label` is None unless asked for."""

    item_id: str
    source_uri: str
    data: bytes
    label: Optional[str] = None


class ReadFailure(NamedTuple):
    """An item (or the unreadable rest of a shard) that could not be read: the failures row's fields."""

    item_id: str
    source_uri: str
    error: str


@dataclasses.dataclass(frozen=True)
class RecordKeys:
    """Which fields of a record hold the image, the id and the label (None: look for the usual names for
    image and id; no label)."""

    image: Optional[str] = None
    id: Optional[str] = None
    label: Optional[str] = None


class CorruptShardError(IOError):
    """A shard broke at `position` (record index or member count): what follows cannot be read."""

    def __init__(self, position: int, message: str):
        self.position = position
        super().__init__(message)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:2000]


def format_of(path: str) -> str:
    """The catalogue format a path's suffix implies: 'tfrecord', 'parquet', 'tar' or 'files'."""
    lower = path.lower()
    for fmt, suffixes in _FORMAT_SUFFIXES:
        if lower.endswith(suffixes):
            return fmt
    return "files"


def detect_format(paths: Sequence[str]) -> str:
    """The one format of `paths` (see `format_of`); ValueError naming examples if they mix formats."""
    if not paths:
        raise ValueError("no paths to detect the input format from")
    kinds: dict[str, str] = {}
    for path in paths:
        kinds.setdefault(format_of(path), path)
    if len(kinds) > 1:
        examples = ", ".join(f"{k}: {p}" for k, p in sorted(kinds.items()))
        raise ValueError(f"the input mixes catalogue formats ({examples}); narrow the glob or pass "
                         f"--input_format")
    return next(iter(kinds))


def _open(path: str, compression: str = CompressionTypes.UNCOMPRESSED) -> IO[bytes]:
    return FileSystems.open(path, compression_type=compression)


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _too_big(size: int, max_bytes: int, what: str) -> Optional[str]:
    if max_bytes and size > max_bytes:
        return f"OSError: {what} of {size} bytes exceeds --max_file_bytes={max_bytes}"
    return None


# ------------------------------------------------------------------------------------------------ files


def _read_at_most(stream: IO[bytes], limit: int, chunk: int = 1 << 20) -> bytes:
    """Up to `limit` bytes of `stream`, read in chunks (a file of unknown size is not read whole)."""
    parts, total = [], 0
    while total < limit:
        part = stream.read(min(chunk, limit - total))
        if not part:
            break
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def read_file(path: str, item_id: str, max_bytes: int = 0, size: Optional[int] = None) -> Union[Record, ReadFailure]:
    """One image file as a Record, or a ReadFailure ('OSError: ...') if unreadable or over `max_bytes`."""
    too_big = _too_big(size, max_bytes, "file") if size is not None else None
    if too_big:
        return ReadFailure(item_id, path, too_big)
    try:
        # UNCOMPRESSED: the bytes of 'x.png.gz' are the file's bytes, not a gunzipped stream. Local files
        # skip FileSystems' dispatch, a noticeable share of the cost of a small file. (Not read(max + 1):
        # that allocates the whole limit for every file.)
        with (open(path, "rb") if bio._is_local(path) else _open(path)) as f:
            data = f.read() if size is not None or not max_bytes else _read_at_most(f, max_bytes + 1)
    except Exception as err:  # filesystems raise their own IOError subclasses
        return ReadFailure(item_id, path, _describe(err))
    if max_bytes and len(data) > max_bytes:  # the listing's size was missing or out of date
        return ReadFailure(item_id, path, f"OSError: file of more than {max_bytes} bytes exceeds "
                                          f"--max_file_bytes={max_bytes}")
    return Record(item_id, path, data)


# --------------------------------------------------------------------------------------------- TFRecord


def _masked_crc32c(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def iter_tfrecords(stream: IO[bytes], verify: bool = True) -> Iterator[bytes]:
    """The records of a TFRecord stream, in order.

    Framing: uint64 length, uint32 masked CRC32C of the length, the data, uint32 masked CRC32C of the data.
    Raises CorruptShardError(index of the first unreadable record) when the stream is cut short or a CRC
    does not match (`verify`): without a valid length nothing after it can be found.
    """
    index = 0
    offset = 0
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            raise CorruptShardError(index, f"record {index} at byte {offset}: stream ends inside the header")
        length, length_crc = struct.unpack("<QI", header)
        if verify and _masked_crc32c(header[:8]) != length_crc:
            raise CorruptShardError(index, f"record {index} at byte {offset}: length CRC mismatch")
        data = stream.read(length)
        footer = stream.read(4)
        if len(data) < length or len(footer) < 4:
            raise CorruptShardError(index, f"record {index} at byte {offset}: stream ends inside the record "
                                           f"({len(data)} of {length} bytes)")
        if verify and _masked_crc32c(data) != struct.unpack("<I", footer)[0]:
            raise CorruptShardError(index, f"record {index} at byte {offset}: data CRC mismatch")
        yield data
        index += 1
        offset += 16 + length


def write_tfrecords(stream: IO[bytes], records: Iterable[bytes]) -> None:
    """Write `records` to `stream` in TFRecord framing (the inverse of `iter_tfrecords`)."""
    for data in records:
        length = struct.pack("<Q", len(data))
        stream.write(length + struct.pack("<I", _masked_crc32c(length)) + data
                     + struct.pack("<I", _masked_crc32c(data)))


_EXAMPLE_CLASS = None


def _example_class():
    """The tf.train.Example message class, built from its descriptor (wire-compatible; no TensorFlow)."""
    global _EXAMPLE_CLASS
    if _EXAMPLE_CLASS is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        F = descriptor_pb2.FieldDescriptorProto
        package = "siamese_dedup.tf_example"
        proto = descriptor_pb2.FileDescriptorProto(name="siamese_dedup/tf_example.proto", package=package,
                                                   syntax="proto3")

        def message(name, fields):
            m = proto.message_type.add(name=name)
            for field_name, number, field_type, type_name in fields:
                label = F.LABEL_REPEATED if type_name is None or name == "Features" else F.LABEL_OPTIONAL
                f = m.field.add(name=field_name, number=number, type=field_type, label=label)
                if type_name:
                    f.type_name = f".{package}.{type_name}"
            return m

        message("BytesList", [("value", 1, F.TYPE_BYTES, None)])
        message("FloatList", [("value", 1, F.TYPE_FLOAT, None)])
        message("Int64List", [("value", 1, F.TYPE_INT64, None)])
        feature = message("Feature", [("bytes_list", 1, F.TYPE_MESSAGE, "BytesList"),
                                      ("float_list", 2, F.TYPE_MESSAGE, "FloatList"),
                                      ("int64_list", 3, F.TYPE_MESSAGE, "Int64List")])
        feature.oneof_decl.add(name="kind")
        for f in feature.field:
            f.oneof_index = 0
        features = message("Features", [("feature", 1, F.TYPE_MESSAGE, "Features.FeatureEntry")])
        entry = features.nested_type.add(name="FeatureEntry")
        entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
        entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                        type_name=f".{package}.Feature")
        entry.options.map_entry = True
        message("Example", [("features", 1, F.TYPE_MESSAGE, "Features")])
        pool = descriptor_pool.DescriptorPool()
        pool.Add(proto)
        _EXAMPLE_CLASS = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.Example"))
    return _EXAMPLE_CLASS


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


def _pick(fields: dict, wanted: Optional[str], candidates: Sequence[str], what: str) -> Optional[str]:
    """The field name to use: `wanted` if given (KeyError if absent), else the first candidate present."""
    if wanted is not None:
        if wanted not in fields:
            raise KeyError(f"no {what} field {wanted!r} (fields: {sorted(fields)[:20]})")
        return wanted
    return next((c for c in candidates if c in fields), None)


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
        id_key = _pick(features, keys.id, ID_KEYS, "id")
        if id_key is not None:
            item_id = _text(_single(features[id_key], id_key))
        image_key = _pick(features, keys.image, IMAGE_KEYS, "image")
        if image_key is None:
            raise KeyError(f"no image field (tried {', '.join(IMAGE_KEYS)}; fields: {sorted(features)[:20]}); "
                           f"pass --image_key")
        data = _single(features[image_key], image_key)
        if not isinstance(data, bytes):
            raise TypeError(f"image field {image_key!r} holds {type(data).__name__}, not bytes")
        label = None
        if keys.label is not None:
            label = _text(_single(features[_pick(features, keys.label, (), "label")], keys.label))
    except (ValueError, KeyError, TypeError) as err:
        return ReadFailure(item_id, source_uri, _describe(err))
    too_big = _too_big(len(data), max_bytes, "image")
    if too_big:
        return ReadFailure(item_id, source_uri, too_big)
    return Record(item_id, source_uri, data, label)


def tfrecord_shard_records(path: str, shard_id: str, keys: RecordKeys = RecordKeys(),
                           max_bytes: int = 0) -> Iterator[Union[Record, ReadFailure]]:
    """Every record of the TFRecord shard at `path` as a Record or ReadFailure, in order (see module doc)."""
    compression = CompressionTypes.GZIP if path.lower().endswith(".gz") else CompressionTypes.UNCOMPRESSED
    index = 0
    try:
        with _open(path, compression) as f:
            for index, record in enumerate(iter_tfrecords(f)):
                yield example_record(record, f"{shard_id}#{index}", f"{path}#{index}", keys, max_bytes)
    except CorruptShardError as err:
        yield ReadFailure(f"{shard_id}#rest@{err.position}", f"{path}#rest@{err.position}",
                          f"CorruptShardError: {err}; the rest of the shard could not be read")
    except Exception as err:  # the shard cannot be opened or the stream fails (gzip, filesystem)
        position = index + 1 if index else 0
        yield ReadFailure(f"{shard_id}#rest@{position}" if position else shard_id,
                          f"{path}#rest@{position}" if position else path, _describe(err))


# ---------------------------------------------------------------------------------------------- Parquet


def _open_parquet(path: str):
    import pyarrow.parquet as pq

    if bio._is_local(path):
        return pq.ParquetFile(path)
    # Beam's GCS reader seeks, so only the footer and the row group read are downloaded.
    return pq.ParquetFile(_open(path))


def parquet_row_groups(path: str) -> list[tuple[int, int, int]]:
    """(row group index, its first row's number in the file, its row count) of each row group of `path`."""
    metadata = _open_parquet(path).metadata
    groups, first = [], 0
    for i in range(metadata.num_row_groups):
        rows = metadata.row_group(i).num_rows
        groups.append((i, first, rows))
        first += rows
    return groups


def _image_column(schema, wanted: Optional[str]) -> str:
    import pyarrow as pa

    def is_image(field):
        t = field.type
        binary = pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
        return binary or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)

    names = schema.names
    if wanted is not None:
        if wanted not in names:
            raise KeyError(f"no image column {wanted!r} (columns: {names[:20]})")
        if not is_image(schema.field(wanted)):
            raise TypeError(f"image column {wanted!r} is {schema.field(wanted).type}, not binary")
        return wanted
    for name in IMAGE_KEYS:
        if name in names and is_image(schema.field(name)):
            return name
    binary = [f.name for f in schema if is_image(f)]
    if len(binary) == 1:
        return binary[0]
    raise KeyError(f"cannot tell the image column among {binary or names[:20]}; pass --image_key")


def parquet_row_group_records(path: str, shard_id: str, row_group: int, first_row: int,
                              keys: RecordKeys = RecordKeys(), max_bytes: int = 0
                              ) -> Iterator[Union[Record, ReadFailure]]:
    """The rows of row group `row_group` of the Parquet file at `path` as Records / ReadFailures.

    Column choice as in the module doc; a struct image column contributes its `bytes` field. A null
    image is a ReadFailure. If the row group cannot be read, one ReadFailure covers it
    (`<shard id>#rows@<first row>`).
    """
    try:
        parquet = _open_parquet(path)
        schema = parquet.schema_arrow
        image_column = _image_column(schema, keys.image)
        id_column = _pick(dict.fromkeys(schema.names), keys.id, ID_KEYS, "id")
        label_column = keys.label
        if label_column is not None and label_column not in schema.names:
            raise KeyError(f"no label column {label_column!r} (columns: {schema.names[:20]})")
        columns = list(dict.fromkeys(c for c in (image_column, id_column, label_column) if c is not None))
        table = parquet.read_row_group(row_group, columns=columns)
        images = table.column(image_column)
        if hasattr(images.type, "get_field_index"):  # struct<bytes, path>
            images = images.combine_chunks().field("bytes")
        images = images.to_pylist()
        ids = table.column(id_column).to_pylist() if id_column else None
        labels = table.column(label_column).to_pylist() if label_column else None
    except Exception as err:
        yield ReadFailure(f"{shard_id}#rows@{first_row}", f"{path}#rows@{first_row}",
                          f"{_describe(err)} (row group {row_group} could not be read)")
        return
    for i, data in enumerate(images):
        row = first_row + i
        item_id = f"{shard_id}#{row}" if ids is None or ids[i] is None else _text(ids[i])
        uri = f"{path}#{row}"
        if data is None:
            yield ReadFailure(item_id, uri, f"ValueError: image column {image_column!r} is null")
            continue
        too_big = _too_big(len(data), max_bytes, "image")
        if too_big:
            yield ReadFailure(item_id, uri, too_big)
            continue
        label = None if labels is None or labels[i] is None else _text(labels[i])
        yield Record(item_id, uri, bytes(data), label)


# -------------------------------------------------------------------------------------------------- tar


def webdataset_key(member_name: str) -> tuple[str, str]:
    """(key, extension) of a WebDataset member: 'a/000123.seg.png' -> ('a/000123', 'seg.png')."""
    directory, base = posixpath.split(member_name)
    stem, dot, extension = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, extension if dot else ""


def _is_image_member(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS if "." in name else False


class _TarInfo(tarfile.TarInfo):
    """TarInfo whose header errors after the first member propagate: `tarfile` in stream mode takes a
    cut, invalid or missing header for the end of the archive, so a cut shard would lose its tail
    silently. Only the end-of-archive marker (a zero block) ends it."""

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.EmptyHeaderError:
            raise tarfile.ReadError("the archive ends without its end-of-archive marker (cut short?)") from None
        except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as err:
            raise tarfile.ReadError(f"bad member header: {err}") from None


def tar_shard_records(path: str, shard_id: str, keys: RecordKeys = RecordKeys(),
                      max_bytes: int = 0) -> Iterator[Union[Record, ReadFailure]]:
    """Every image member of the tar shard at `path` as a Record / ReadFailure, in order.

    The stream is read once, front to back (a gs:// object is not downloaded whole). With
    `keys.label` = an extension (e.g. 'cls'), the member `<key>.<extension>` gives the label of the images
    with that key; WebDataset writes a sample's members together, so labels are matched within a run of
    members with the same key. A member over `max_bytes` is not read.
    """
    count = 0  # image members read
    pending: list[tuple[str, str, Optional[bytes], int]] = []  # images of the current key
    pending_key, label = None, None
    seen: dict[str, int] = {}  # member name -> repeats so far
    try:
        with _open(path) as f, tarfile.open(fileobj=f, mode="r|*", tarinfo=_TarInfo) as archive:
            for member in archive:
                if member.isdir():
                    continue
                if not member.isfile():  # links, devices, pipes: nothing to read; an image name is an item
                    if _is_image_member(member.name):
                        count += 1
                        seen[member.name] = seen.get(member.name, -1) + 1
                        uri = f"{path}#{member.name}" + (f"@{seen[member.name]}" if seen[member.name] else "")
                        pending.append((f"{shard_id}#{member.name}", uri, _tar_member_kind(member), member.size))
                    continue
                key, extension = webdataset_key(member.name)
                if key != pending_key:
                    yield from _tar_items(pending, label, max_bytes)
                    pending, pending_key, label = [], key, None
                if keys.label is not None and extension == keys.label:
                    label = _text(archive.extractfile(member).read()).strip()
                    continue
                if not _is_image_member(member.name):
                    continue
                data = None
                if not (max_bytes and member.size > max_bytes):
                    data = archive.extractfile(member).read()
                count += 1
                # A name can repeat in a tar: the repeats keep the item id (refused later as a repeated
                # id) but get their own source_uri.
                seen[member.name] = seen.get(member.name, -1) + 1
                uri = f"{path}#{member.name}" + (f"@{seen[member.name]}" if seen[member.name] else "")
                pending.append((f"{shard_id}#{member.name}", uri, data, member.size))
    except Exception as err:  # tarfile.ReadError, gzip errors, a stream cut short
        yield from _tar_items(pending, label, max_bytes)
        if count:
            yield ReadFailure(f"{shard_id}#rest@{count}", f"{path}#rest@{count}",
                              f"{_describe(err)}; the rest of the shard could not be read")
        else:
            yield ReadFailure(shard_id, path, _describe(err))
        return
    yield from _tar_items(pending, label, max_bytes)


def _tar_member_kind(member: tarfile.TarInfo) -> str:
    """Why a tar member that is not a regular file cannot be an item."""
    if member.issym():
        return f"OSError: the tar member is a symbolic link (to {member.linkname!r}): links in shards are not followed"
    if member.islnk():
        return f"OSError: the tar member is a hard link (to {member.linkname!r}): links in shards are not followed"
    kinds = ((member.ischr, "a character device"), (member.isblk, "a block device"), (member.isfifo, "a FIFO"))
    kind = next((name for test, name in kinds if test()), f"of type {member.type!r}")
    return f"OSError: the tar member is {kind}, not a file"


def _tar_items(pending, label, max_bytes) -> Iterator[Union[Record, ReadFailure]]:
    """Records of the pending image members; `data` None: over the size limit; a str: why it is not a file."""
    for item_id, uri, data, size in pending:
        if data is None:
            yield ReadFailure(item_id, uri, _too_big(size, max_bytes, "member"))
        elif isinstance(data, str):
            yield ReadFailure(item_id, uri, data)
        else:
            yield Record(item_id, uri, data, label)


# -------------------------------------------------------------------------------------------- listing

class Listed(NamedTuple):
    """One entry of a catalogue's listing: a file to read (size in bytes, -1 unknown), or an entry that
    cannot be an item, with why (`problem`): it becomes a failures row, never a silent gap."""

    path: str
    size: int
    problem: Optional[str] = None
    modified: Optional[float] = None  # last modification, seconds since the epoch, when the filesystem says


_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _glob_parts(base: str, parts: list[str], seen: set) -> Iterator[tuple[str, Optional[str]]]:
    """(path, problem) of the local entries under `base` matching glob `parts` (see `local_listing`)."""
    if not parts:
        if base not in seen:
            seen.add(base)
            yield base, None
        return
    part, rest = parts[0], parts[1:]
    if part == "**":  # any depth, none included; as the last part: every file below
        if rest:
            yield from _glob_parts(base, rest, seen)
        for entry in _scan(base):
            if entry.name.startswith("."):
                continue
            path = os.path.join(base, entry.name)
            if entry.is_dir(follow_symlinks=False):
                yield from _glob_parts(path, parts, seen)
            elif entry.is_symlink() and os.path.isdir(path):
                yield path, ("a symbolic link to a directory, not followed under '**' (a link can loop); "
                             "its files are not listed: give a glob of its target")
            elif not rest:
                yield from _glob_parts(path, rest, seen)
        return
    if not glob_module.has_magic(part):
        path = os.path.join(base, part)
        if rest:
            if os.path.isdir(path):
                yield from _glob_parts(path, rest, seen)
        elif os.path.lexists(path):
            yield from _glob_parts(path, rest, seen)
        return
    for entry in _scan(base):
        if entry.name.startswith(".") and not part.startswith("."):
            continue  # hidden entries, as glob skips them
        if not fnmatch.fnmatchcase(entry.name, part):
            continue
        if rest and not entry.is_dir():
            continue
        yield from _glob_parts(os.path.join(base, entry.name), rest, seen)


def _scan(directory: str) -> list:
    try:
        with os.scandir(directory or ".") as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def _classify(path: str) -> Optional[Listed]:
    """The Listed entry of local `path`, or None for a directory (not an item)."""
    try:
        info = os.stat(path)  # follows links
    except OSError as err:
        if err.errno == errno.ELOOP:
            return Listed(path, -1, "a symbolic link loop (the link points back at itself)")
        if os.path.islink(path):
            return Listed(path, -1, f"a dangling symbolic link (to {os.readlink(path)!r}, which does not exist)")
        return Listed(path, -1, _describe(err))
    if stat.S_ISDIR(info.st_mode):
        return None
    for is_kind, kind in _FILE_KINDS:
        if is_kind(info.st_mode):
            return Listed(path, -1, f"not a regular file: {kind}")
    return Listed(path, int(info.st_size), modified=info.st_mtime_ns / 1e9)


def local_listing(input_glob: str) -> Iterator[Listed]:
    """Every entry a local glob matches, each as a Listed: files with their size, and whatever cannot be
    read (dangling links, link loops, pipes, devices, links to directories under '**') with why.

    Glob syntax as Python's `glob` (hidden names need a leading '.' in the pattern), with '**' matching
    any depth including none ('cat/**/*.png' matches cat/a.png and cat/x/y/b.png), the same as a GCS
    glob's '**' up to that; '**' does not descend into symbolic links to directories. Beam's local match
    drops dangling links and loops without a word, which would lose items.
    """
    pattern = os.path.expanduser(input_glob)
    absolute = os.path.isabs(pattern)
    parts = [p for p in pattern.split(os.sep) if p]
    base = os.sep if absolute else ""
    for path, problem in _glob_parts(base, parts, set()):
        path = path if absolute or not path.startswith("./") else path[2:]
        if problem is not None:
            yield Listed(path, -1, problem)
            continue
        listed = _classify(path)
        if listed is not None:
            yield listed


def list_catalogue(input_glob: str, limit: Optional[int] = None) -> list[Listed]:
    """The listing of `input_glob` (local: `local_listing`; gs:// and other filesystems: Beam's match),
    in path order; at most `limit` entries (the first found) when given."""
    if bio._is_local(input_glob):
        found = []
        for listed in local_listing(input_glob):
            found.append(listed)
            if limit is not None and len(found) >= limit:
                break
        return sorted(found)
    result = FileSystems.match([input_glob], limits=None if limit is None else [limit])[0]
    return sorted(Listed(*_listed(m), modified=getattr(m, "last_updated_in_seconds", None) or None)
                  for m in result.metadata_list if not _is_directory(m.path))


# ------------------------------------------------------------------------------------------------- Beam


def _listed(metadata) -> tuple[str, int]:
    """FileMetadata -> (path, size in bytes or -1): plain values, which Beam encodes without pickling."""
    size = metadata.size_in_bytes
    return metadata.path, -1 if size is None else int(size)


def _is_directory(path: str) -> bool:
    # GCS "folder" placeholder objects end in '/' (a local match lists files only).
    return path.endswith("/")


class _CountingFn(beam.DoFn):
    """Emits Records on the main output and ReadFailures on FAILURES_TAG, counting items read."""

    def __init__(self):
        self._items_read = Metrics.counter(METRICS_NAMESPACE, "items_read")
        self._read_failed = Metrics.counter(METRICS_NAMESPACE, "read_failed")
        self._failed = Metrics.counter(METRICS_NAMESPACE, "failed")

    def _emit(self, results: Iterable[Union[Record, ReadFailure]]):
        for result in results:
            self._items_read.inc()
            if isinstance(result, ReadFailure):
                self._read_failed.inc()
                self._failed.inc()
                yield beam.pvalue.TaggedOutput(FAILURES_TAG, result)
            else:
                yield result


class _ReadFileFn(_CountingFn):
    """A list of (path, size) of image files -> a Record (or ReadFailure) per file."""

    def __init__(self, input_glob: str, max_bytes: int):
        super().__init__()
        self._input_glob = input_glob
        self._max_bytes = max_bytes

    def process(self, batch):
        for path, size in batch:
            if _is_directory(path):
                continue
            item_id = bio.item_id_for(path, self._input_glob)
            yield from self._emit([read_file(path, item_id, self._max_bytes, None if size < 0 else size)])


class _ReadShardFn(_CountingFn):
    """(path, size) of a TFRecord or tar shard -> the Records (and ReadFailures) in it."""

    def __init__(self, input_glob: str, input_format: str, keys: RecordKeys, max_bytes: int):
        super().__init__()
        self._input_glob = input_glob
        self._reader = {"tfrecord": tfrecord_shard_records, "tar": tar_shard_records}[input_format]
        self._keys = keys
        self._max_bytes = max_bytes

    def process(self, listed):
        path, _ = listed
        if _is_directory(path):
            return
        shard_id = bio.item_id_for(path, self._input_glob)
        yield from self._emit(self._reader(path, shard_id, self._keys, self._max_bytes))


class _ParquetRowGroupsFn(_CountingFn):
    """(path, size) of a Parquet file -> (path, shard id, row group, first row) per row group; a file
    whose footer cannot be read is one ReadFailure."""

    def __init__(self, input_glob: str):
        super().__init__()
        self._input_glob = input_glob

    def process(self, listed):
        path, _ = listed
        if _is_directory(path):
            return
        shard_id = bio.item_id_for(path, self._input_glob)
        try:
            groups = parquet_row_groups(path)
        except Exception as err:
            yield from self._emit([ReadFailure(shard_id, path, f"{_describe(err)} (no readable Parquet footer)")])
            return
        for row_group, first_row, rows in groups:
            if rows:
                yield path, shard_id, row_group, first_row


class _ReadRowGroupFn(_CountingFn):
    """(path, shard id, row group, first row) -> the Records (and ReadFailures) of that row group."""

    def __init__(self, keys: RecordKeys, max_bytes: int):
        super().__init__()
        self._keys = keys
        self._max_bytes = max_bytes

    def process(self, element):
        path, shard_id, row_group, first_row = element
        yield from self._emit(
            parquet_row_group_records(path, shard_id, row_group, first_row, self._keys, self._max_bytes))


class _ListLocalFn(_CountingFn):
    """A local glob -> (path, size) of every file it matches; entries that cannot be items (dangling
    links, loops, pipes, devices) -> ReadFailures with the reason (`local_listing`)."""

    def __init__(self, input_glob: str):
        super().__init__()
        self._input_glob = input_glob

    def process(self, glob):
        for listed in local_listing(glob):
            if listed.problem is None:
                yield listed.path, listed.size
            else:
                yield from self._emit([ReadFailure(bio.item_id_for(listed.path, self._input_glob), listed.path,
                                                   f"OSError: {listed.problem}")])


class ReadCatalogue(beam.PTransform):
    """Read the catalogue `input_glob` in `input_format` (one of FORMATS) -> (records, failures).

    records: PCollection of Record; failures: PCollection of ReadFailure. Every item read is counted in
    the 'items_read' counter (namespace METRICS_NAMESPACE), failures also in 'read_failed' and 'failed'.
    The matched files (shards) are spread over the workers before they are opened (image files in groups of
    FILES_PER_READ); Parquet files are split further into row groups.
    """

    def __init__(self, input_glob: str, input_format: str, keys: RecordKeys = RecordKeys(), max_bytes: int = 0,
                 paths: Optional[Sequence[str]] = None):
        super().__init__()
        if input_format not in FORMATS:
            raise ValueError(f"input_format must be one of {FORMATS}, got {input_format!r}")
        if paths is not None and input_format != "files":
            raise ValueError("a list of paths is for image files (input_format files)")
        self._input_glob = input_glob
        self._format = input_format
        self._keys = keys
        self._max_bytes = max_bytes
        self._paths = None if paths is None else sorted(paths)

    def expand(self, pbegin):
        if self._paths is not None:  # given paths (embed --input_list): no listing; the reader sizes them
            matched = pbegin | "GivenPaths" >> beam.Create([(p, -1) for p in self._paths])
            records, failures = self._read(matched)
            return records, failures
        # The listing runs on one worker: spread the paths before anything is opened.
        if bio._is_local(self._input_glob):
            # Our own listing: every entry, links and special files included, accounted for.
            listing = (pbegin
                       | "Glob" >> beam.Create([self._input_glob])
                       | "ListLocal" >> beam.ParDo(_ListLocalFn(self._input_glob)).with_outputs(
                           FAILURES_TAG, main="files"))
            matched, unlisted = listing.files, listing[FAILURES_TAG]
        else:
            matched = (pbegin
                       | "MatchFiles" >> fileio.MatchFiles(self._input_glob)
                       | "Listed" >> beam.Map(_listed).with_output_types(typing.Tuple[str, int]))
            unlisted = pbegin | "NothingUnlisted" >> beam.Create([])
        records, failures = self._read(matched)
        return records, (failures, unlisted) | "AllReadFailures" >> beam.Flatten()

    def _read(self, matched):
        if self._format == "files":
            # Image files are small: spread them in groups, a fraction of the shuffle's per-element cost.
            read = (matched
                    | "GroupFiles" >> beam.BatchElements(min_batch_size=FILES_PER_READ,
                                                         max_batch_size=FILES_PER_READ)
                    | "SpreadFiles" >> beam.Reshuffle()
                    | "ReadFiles" >> beam.ParDo(_ReadFileFn(self._input_glob, self._max_bytes)).with_outputs(
                        FAILURES_TAG, main="records"))
            return read.records, read[FAILURES_TAG]
        files = matched | "SpreadFiles" >> beam.Reshuffle()
        if self._format in ("tfrecord", "tar"):
            read = files | "ReadShards" >> beam.ParDo(
                _ReadShardFn(self._input_glob, self._format, self._keys, self._max_bytes)
            ).with_outputs(FAILURES_TAG, main="records")
            return read.records, read[FAILURES_TAG]
        groups = files | "RowGroups" >> beam.ParDo(_ParquetRowGroupsFn(self._input_glob)).with_outputs(
            FAILURES_TAG, main="groups")
        read = (groups.groups
                | "SpreadRowGroups" >> beam.Reshuffle()
                | "ReadRowGroups" >> beam.ParDo(_ReadRowGroupFn(self._keys, self._max_bytes)).with_outputs(
                    FAILURES_TAG, main="records"))
        failures = (groups[FAILURES_TAG], read[FAILURES_TAG]) | "ParquetFailures" >> beam.Flatten()
        return read.records, failures
