"""Shared I/O of the pipelines: item ids, Parquet tables and small JSON documents, local or gs://.

Everything goes through `apache_beam.io.filesystems.FileSystems`, so the same call reads a local path on
the DirectRunner and a `gs://` path on Dataflow. No TensorFlow here.

Tables on disk follow DESIGN.md: stage outputs are `DIR/<name>/<name>-SSSSS-of-NNNNN.parquet`, written
by `WriteTable` with the schema from `schemas.tables`, and read back with `read_parquet_table`, which
validates them with `schemas.validate_table`.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window

from schemas.tables import validate_table

_WILDCARDS = "*?["


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


@functools.lru_cache(maxsize=64)
def glob_prefix(input_glob: str) -> str:
    """The non-wildcard directory prefix of `input_glob`, ending in '/' (or '' if there is none).

    'cat/images/*.png' -> 'cat/images/'; 'gs://b/cat/**/*.png' -> 'gs://b/cat/'; 'cat/x.png' -> 'cat/'.
    """
    glob = input_glob.replace(os.sep, "/") if _is_local(input_glob) else input_glob
    cut = min((glob.find(c) for c in _WILDCARDS if c in glob), default=len(glob))
    head = glob[:cut]
    return head[: head.rfind("/") + 1]


@functools.lru_cache(maxsize=64)
def _prefix_and_locality(input_glob: str) -> tuple[str, bool]:
    return glob_prefix(input_glob), _is_local(input_glob)


def item_id_for(path: str, input_glob: str) -> str:
    """The item id of file `path` matched by `input_glob`: its path relative to the glob's prefix.

    Ids use '/' separators whatever the platform, so they are stable across runs and machines as long as
    the catalogue's layout below the prefix is the same ('cat/images/*.png' -> 'item_000123.png';
    'cat/**/*.png' -> 'shoes/item_1.png'). Local paths may be relative or absolute on either side.
    Raises ValueError if `path` does not lie under the prefix.
    """
    prefix, local_glob = _prefix_and_locality(input_glob)
    if prefix and path.startswith(prefix) and len(path) > len(prefix) and ".." not in path:
        # Fast path (the common case: the path as the glob matched it); a million files add up. A path
        # under a local prefix is local (a scheme would come first), one under a remote prefix remote.
        rel = path[len(prefix):]
        return rel.replace(os.sep, "/") if local_glob else rel.lstrip("/")
    if _is_local(path) and _is_local(input_glob):
        base = os.path.abspath(prefix or ".")
        rel = os.path.relpath(os.path.abspath(path), base)
        if rel == "." or rel == ".." or rel.startswith(".." + os.sep):
            raise ValueError(f"{path!r} does not lie under the prefix {prefix!r} of the glob {input_glob!r}")
        return rel.replace(os.sep, "/")
    if not path.startswith(prefix) or len(path) == len(prefix):
        raise ValueError(f"{path!r} does not lie under the prefix {prefix!r} of the glob {input_glob!r}")
    return path[len(prefix):].lstrip("/")


def table_glob(output_dir: str, name: str) -> str:
    """The glob of the shards of table `name` written under `output_dir` (DIR/<name>/<name>-*.parquet)."""
    return FileSystems.join(output_dir, name, f"{name}-*.parquet")


def match_paths(glob: str, limit: int | None = None) -> list[str]:
    """Sorted paths of the files matching `glob` (local or gs://); empty list if none. With `limit`, at
    most that many (the first the filesystem lists), without listing the rest."""
    result = FileSystems.match([glob], limits=None if limit is None else [limit])[0]
    return sorted(m.path for m in result.metadata_list)


def read_parquet_table(glob: str, table_name: str, dim: int | None = None) -> pa.Table:
    """Read every Parquet file matching `glob` into one table validated as table `table_name`.

    `table_name` is one of 'templates', 'failures', 'matches', 'clusters' (schemas.tables); `dim`
    optionally pins the templates' embedding dimension. Shards are concatenated in path order. Raises
    FileNotFoundError naming the glob if nothing matches, and schemas.SchemaError if the content breaks
    the table's contract.
    """
    paths = match_paths(glob)
    if not paths:
        raise FileNotFoundError(f"no {table_name} Parquet files match {glob!r}")
    tables = []
    for path in paths:
        # Read whole files: a GCS download stream is not always seekable, and Parquet needs seeks.
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            data = f.read()
        try:
            tables.append(pq.read_table(pa.BufferReader(data)))
        except (pa.ArrowInvalid, OSError) as err:
            raise OSError(f"{path}: not a readable Parquet file: {err}") from err
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid as err:
        raise OSError(f"the {table_name} shards matching {glob!r} have different schemas: {err}") from err
    return validate_table(table, table_name, dim)


def read_table_dir(output_dir: str, name: str, dim: int | None = None) -> pa.Table:
    """Read table `name` that a stage wrote under `output_dir` (see `table_glob`), validated."""
    return read_parquet_table(table_glob(output_dir, name), name, dim)


def conform_table(data: pa.Table | pa.RecordBatch | Iterable[dict], schema: pa.Schema) -> pa.Table:
    """`data` (a Table, a RecordBatch or dict rows) as a Table with exactly `schema`'s columns and types.

    Columns are selected and ordered by name and cast (e.g. list<float> -> fixed_size_list<float32>[d]);
    raises KeyError for a missing column and pyarrow errors for values that do not fit.
    """
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if isinstance(data, pa.Table):
        missing = [n for n in schema.names if n not in data.schema.names]
        if missing:
            raise KeyError(f"table lacks columns {missing} of the schema")
        return data.select(schema.names).cast(schema)
    return pa.Table.from_pylist(list(data), schema=schema)


class _ToArrowTables(beam.DoFn):
    """Turns dict rows (buffered per bundle) and Tables/RecordBatches into Tables with `schema`."""

    def __init__(self, schema: pa.Schema, rows_per_table: int):
        self._schema = schema
        self._rows_per_table = rows_per_table
        self._rows: list[dict] = []

    def start_bundle(self):
        self._rows = []

    def process(self, element):
        if isinstance(element, dict):
            self._rows.append(element)
            if len(self._rows) >= self._rows_per_table:
                yield self._flush()
            return
        table = conform_table(element, self._schema)
        if table.num_rows:
            yield table

    def finish_bundle(self):
        if self._rows:
            # Batch pipelines only: buffered rows leave in the global window (the writer re-windows
            # into the global window anyway).
            yield window.GlobalWindows.windowed_value_at_end_of_window(self._flush())

    def _flush(self) -> pa.Table:
        table = conform_table(self._rows, self._schema)
        self._rows = []
        return table


class _ParquetFileWriter:
    """One open Parquet shard: buffers tables and writes row groups of exactly `row_group_rows` rows
    (the last one of the file may be shorter); `row_group_rows=None` writes each table as it comes."""

    def __init__(self, handle, schema: pa.Schema, codec: str, row_group_rows: int | None):
        self.handle = handle
        self._writer = pq.ParquetWriter(handle, schema, compression=codec)
        self._rows = row_group_rows
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def write(self, table: pa.Table) -> None:
        if not self._rows:
            self._writer.write_table(table)
            return
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self._rows:
            buffered = pa.concat_tables(self._pending)
            full = (buffered.num_rows // self._rows) * self._rows
            self._writer.write_table(buffered.slice(0, full), row_group_size=self._rows)
            rest = buffered.slice(full)
            self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self._pending_rows:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=self._rows)
        self._writer.close()
        self.handle.close()


class _ParquetSink(filebasedsink.FileBasedSink):
    """Beam file sink of pyarrow Tables as Parquet shards, with row groups of a fixed number of rows."""

    def __init__(self, file_path_prefix: str, schema: pa.Schema, num_shards: int, row_group_rows: int | None,
                 codec: str = "snappy"):
        super().__init__(file_path_prefix, coder=None, file_name_suffix=".parquet", num_shards=num_shards,
                         mime_type="application/x-parquet",
                         # Parquet compresses its pages itself.
                         compression_type=CompressionTypes.UNCOMPRESSED)
        self._schema = schema
        self._row_group_rows = row_group_rows
        self._codec = codec

    def open(self, temp_path):
        return _ParquetFileWriter(super().open(temp_path), self._schema, self._codec, self._row_group_rows)

    def write_record(self, writer, value):
        writer.write(value)

    def close(self, writer):
        writer.close()


class WriteTable(beam.PTransform):
    """Write a PCollection of dict rows, pyarrow Tables or RecordBatches as table `name` under `output_dir`.

    Files: `output_dir/<name>/<name>-SSSSS-of-NNNNN.parquet`, with exactly `schema` (pass
    `schemas.schema_for(name, dim)`); fixed_size_list embeddings and timestamp[us, UTC] columns keep
    their types on read-back. An empty PCollection still writes one empty shard with the schema, so
    readers always find the table. `num_shards=0` lets the runner choose. `row_group_rows` fixes the rows
    per Parquet row group within each shard (the last group of a shard holds the remainder), so a reader
    can stream a table in blocks of that size; None writes whatever each bundle gathered (up to
    `rows_per_table` rows) as a row group. Returns the PCollection of written file paths. Bounded
    (batch) input only.
    """

    def __init__(self, output_dir: str, name: str, schema: pa.Schema, num_shards: int = 0,
                 rows_per_table: int = 10_000, row_group_rows: int | None = None):
        super().__init__()
        if row_group_rows is not None and row_group_rows < 1:
            raise ValueError(f"row_group_rows must be >= 1 or None, got {row_group_rows}")
        self._output_dir = output_dir
        self._name = name
        self._schema = schema
        self._num_shards = num_shards
        self._rows_per_table = rows_per_table if not row_group_rows else max(rows_per_table, row_group_rows)
        self._row_group_rows = row_group_rows

    def expand(self, pcoll):
        prefix = FileSystems.join(self._output_dir, self._name, self._name)
        return (
            pcoll
            | "ToArrow" >> beam.ParDo(_ToArrowTables(self._schema, self._rows_per_table))
            | "WriteParquet" >> beam.io.Write(
                _ParquetSink(prefix, self._schema, self._num_shards, self._row_group_rows))
        )


def write_json(path: str, obj: Any) -> str:
    """Write `obj` as indented UTF-8 JSON to `path` (local or gs://; parent dirs made); returns `path`."""
    data = json.dumps(obj, indent=2, sort_keys=False, default=str).encode("utf-8")
    with FileSystems.create(path, mime_type="application/json") as f:
        f.write(data)
    return path


def write_text(path: str, text: str, mime: str = "text/plain") -> str:
    """Write `text` as UTF-8 to `path` (local or gs://; parent dirs made); returns `path`."""
    with FileSystems.create(path, mime_type=mime, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        f.write(text.encode("utf-8"))
    return path


def read_text(path: str) -> str:
    """The UTF-8 text at `path` (local or gs://). Raises FileNotFoundError if it is missing."""
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read().decode("utf-8")


def read_json(path: str) -> Any:
    """Parse the JSON document at `path` (local or gs://). Raises FileNotFoundError if it is missing."""
    if not FileSystems.exists(path):
        raise FileNotFoundError(f"no such JSON document: {path}")
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return json.loads(f.read().decode("utf-8"))


def count_parquet_rows(glob: str) -> int:
    """Total rows of the Parquet files matching `glob`, from their footers (local files are not read in
    full; remote ones are downloaded). 0 if nothing matches."""
    total = 0
    for path in match_paths(glob):
        if _is_local(path):
            total += pq.ParquetFile(path).metadata.num_rows
        else:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                total += pq.read_metadata(pa.BufferReader(f.read())).num_rows
    return total

