"""Parquet files: one item a row.

The image is a binary column (or a struct column with a `bytes` field, as Hugging Face `datasets` writes
images); an optional id column and an optional label column. item_id = the id when the row has one, else
`<shard id>#<row number in the file>`; source_uri = `<path>#<row number>`. A file is split by row group,
each read on its own.
"""
from __future__ import annotations

from typing import Iterator, Optional, Union

from beam_pipeline import io as bio
from beam_pipeline.sources.record import (ID_KEYS, IMAGE_KEYS, ReadFailure, Record, RecordKeys, as_text, describe,
                                          open_stream, pick, too_big)

SUFFIXES = (".parquet", ".pq")


def _open_parquet(path: str):
    import pyarrow.parquet as pq

    if bio._is_local(path):
        return pq.ParquetFile(path)
    # Beam's GCS reader seeks, so only the footer and the row group read are downloaded.
    return pq.ParquetFile(open_stream(path))


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
        id_column = pick(dict.fromkeys(schema.names), keys.id, ID_KEYS, "id")
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
                          f"{describe(err)} (row group {row_group} could not be read)")
        return
    for i, data in enumerate(images):
        row = first_row + i
        item_id = f"{shard_id}#{row}" if ids is None or ids[i] is None else as_text(ids[i])
        uri = f"{path}#{row}"
        if data is None:
            yield ReadFailure(item_id, uri, f"ValueError: image column {image_column!r} is null")
            continue
        over = too_big(len(data), max_bytes, "image")
        if over:
            yield ReadFailure(item_id, uri, over)
            continue
        label = None if labels is None or labels[i] is None else as_text(labels[i])
        yield Record(item_id, uri, bytes(data), label)
