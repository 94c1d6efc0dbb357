"""Shard readers: every kind of catalogue the embed pipeline takes, turned into image records.

A catalogue is a glob (local or gs://, through Beam's FileSystems) of one of the formats (`FORMATS`), each
read by its own module:

- `files` (`files.py`): image files, one item each (JPEG, PNG, WebP, BMP, GIF, TIFF, ...).
- `tfrecord` (`tfrecord.py`): TFRecord shards of serialized `tf.train.Example`, one item a record.
- `parquet` (`parquet.py`): Parquet files with a binary image column, one item a row.
- `tar` (`tar.py`): tar shards, WebDataset-style, one item an image member.

In the record formats, item_id = the id field when the shard has one, else `<shard id>#<position>`
(`<shard id>#<member name>` for tar), where `<shard id>` is the shard's path relative to the glob's
prefix and the position is the record's index in the TFRecord shard or its row number in the Parquet
file: stable as long as the shard is. source_uri = `<shard path>#<position or member name>` (a member
name's repeats in one tar: `<name>@<n>`), unique per input record even when ids repeat (the embed
pipeline refuses repeated ids at its validate stage).

Work is split across workers by file (files), by shard (TFRecord, tar: a shard is read sequentially by
one worker; catalogues come as many shards) and by row group (Parquet). Everything that cannot be read
becomes a `ReadFailure` (`record.py`): a file, record or member over the size limit, a record whose CRC
does not match, a member without bytes. When a shard breaks in the middle (a cut or corrupted TFRecord, a
broken tar stream) the records after the break cannot be enumerated: the rest of the shard becomes one
failure whose item_id is `<shard id>#rest@<position>` and whose message says where it broke; the records
before it are kept. An unreadable shard is one failure with the shard's id.

`listing.py` lists a catalogue (every entry, or why it cannot be an item). The pure readers
(`tfrecord.tfrecord_shard_records`, `parquet.parquet_row_group_records`, `tar.tar_shard_records`, ...)
need no Beam pipeline; `catalogue.ReadCatalogue` is the thin PTransform the embed pipeline applies.

The names below are the package's API for the pipeline stages (embed, streaming, nightly, report) and the
trainer's hard negatives.
"""
from beam_pipeline.sources.catalogue import FAILURES_TAG, FORMATS, ReadCatalogue, detect_format
from beam_pipeline.sources.files import read_file
from beam_pipeline.sources.listing import list_catalogue
from beam_pipeline.sources.record import DEFAULT_MAX_FILE_BYTES, IMAGE_KEYS, ReadFailure, Record, RecordKeys

__all__ = ["DEFAULT_MAX_FILE_BYTES", "FAILURES_TAG", "FORMATS", "IMAGE_KEYS", "ReadCatalogue", "ReadFailure",
           "Record", "RecordKeys", "detect_format", "list_catalogue", "read_file"]
