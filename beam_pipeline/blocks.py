"""Templates staged once into fixed-size blocks that every matching task reads (pure pyarrow/NumPy).

The match pipeline reads the templates Parquet exactly once: `stage_templates` streams the files (one
row batch at a time, so the driver holds one batch and one block, never the catalogue), refuses what
cannot be matched before any matching starts, and writes the rows in blocks of `block_size` to Arrow IPC
files `STAGE/block-BBBBB.arrow` (columns item_id, embedding). A matching task then loads only the blocks
it multiplies: memory per worker is a few blocks (8192 x 128 float32 = 4 MiB each), not the catalogue,
and local block files are memory-mapped. The same functions work on gs:// through Beam's FileSystems.

Row order is the order of the files (sorted by path) and of the rows within them: deterministic, and no
global sort (which would need the whole catalogue in one place) is needed, because pairs are oriented by
item_id when they are written.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from schemas.tables import UNIT_NORM_TOLERANCE, unit_vector_problems

STAGE_COLUMNS = ["item_id", "embedding", "model_id"]
READ_BATCH_ROWS = 65_536


@dataclasses.dataclass
class Manifest:
    """What `stage_templates` wrote: n rows of dimension dim in len(block_rows) blocks under directory."""

    directory: str
    block_size: int
    n: int
    dim: int
    model_id: str
    block_rows: list[int]
    files: list[str]

    @property
    def num_blocks(self) -> int:
        return len(self.block_rows)

    def block_path(self, block: int) -> str:
        return FileSystems.join(self.directory, f"block-{int(block):05d}.arrow")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict) -> "Manifest":
        return cls(**doc)


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def match_paths(glob: str) -> list[str]:
    """Sorted paths matching `glob` (local or gs://)."""
    result = FileSystems.match([glob])[0]
    return sorted(m.path for m in result.metadata_list)


def _parquet_file(path: str) -> pq.ParquetFile:
    if _is_local(path):
        return pq.ParquetFile(path)
    # A GCS download stream is not always seekable; Parquet needs seeks: read the file whole.
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return pq.ParquetFile(pa.BufferReader(f.read()))


def iter_parquet_batches(glob: str, columns: list[str], what: str = "templates",
                         batch_rows: int = READ_BATCH_ROWS) -> Iterator[tuple[str, pa.RecordBatch]]:
    """(path, batch) for every row batch of the Parquet files matching `glob`, only `columns`, in path order.

    Raises FileNotFoundError naming the glob when nothing matches and ValueError naming the file and the
    column when one is missing.
    """
    paths = match_paths(glob)
    if not paths:
        raise FileNotFoundError(f"no {what} Parquet files match {glob!r}")
    for path in paths:
        try:
            f = _parquet_file(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise OSError(f"{path}: not a readable Parquet file: {err}") from err
        missing = [c for c in columns if c not in f.schema_arrow.names]
        if missing:
            raise ValueError(f"{what} {path}: missing columns {missing}")
        for batch in f.iter_batches(batch_size=batch_rows, columns=columns):
            yield path, batch


def _embedding_matrix(column: pa.Array, path: str) -> np.ndarray:
    if not pa.types.is_fixed_size_list(column.type) or column.type.value_type != pa.float32():
        raise ValueError(f"templates {path}: column 'embedding' must be fixed_size_list<float32>[dim], got {column.type}")
    if column.null_count:
        raise ValueError(f"templates {path}: column 'embedding' has {column.null_count} nulls")
    d = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)


def _check_rows(emb: np.ndarray, ids: pa.Array, path: str) -> None:
    """Refuse NaN / infinite / non-unit rows, naming the item."""
    nonfinite, bad, norms = unit_vector_problems(emb)
    if nonfinite.size:
        k = int(nonfinite[0])
        raise ValueError(f"templates {path}: item {ids[k].as_py()!r} has NaN or infinite embedding values; "
                         "embeddings must be finite unit vectors")
    if bad.size:
        k = int(bad[0])
        raise ValueError(
            f"templates {path}: item {ids[k].as_py()!r} has embedding norm {norms[k]:.6f}; embeddings must be "
            f"L2-normalised unit vectors ({bad.size} rows of this batch off by more than "
            f"{UNIT_NORM_TOLERANCE})"
        )


def _write_block(path: str, ids: pa.Array, emb: np.ndarray) -> None:
    d = emb.shape[1]
    table = pa.table({
        "item_id": ids,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), d),
    })
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with FileSystems.create(path, mime_type="application/octet-stream") as f:
        f.write(sink.getvalue().to_pybytes())


def stage_templates(glob: str, directory: str, block_size: int, *, what: str = "templates") -> Manifest:
    """Stream the templates matching `glob` into blocks under `directory`; refuse what cannot be matched.

    Refused (ValueError, before any matching): embeddings of several dimensions or model_ids, NaN /
    infinite / non-unit embeddings, null or duplicate item ids. Returns the Manifest (also written as
    `directory/manifest.json`). On a refusal the blocks written so far are deleted.
    """
    block_size = int(block_size)
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    dims: dict[int, str] = {}
    models: dict[str, str] = {}
    all_ids: list[pa.Array] = []
    files: list[str] = []
    block_rows: list[int] = []
    buf_ids: list[pa.Array] = []
    buf_emb: list[np.ndarray] = []
    buffered = 0
    manifest = Manifest(directory, block_size, 0, 0, "", block_rows, files)

    def flush(rows: int) -> None:
        nonlocal buf_ids, buf_emb, buffered
        ids = pa.concat_arrays(buf_ids) if len(buf_ids) > 1 else buf_ids[0]
        emb = np.concatenate(buf_emb) if len(buf_emb) > 1 else buf_emb[0]
        _write_block(manifest.block_path(len(block_rows)), ids.slice(0, rows), emb[:rows])
        block_rows.append(rows)
        rest_ids, rest_emb = ids.slice(rows), emb[rows:]
        buf_ids, buf_emb = ([rest_ids], [rest_emb]) if len(rest_ids) else ([], [])
        buffered = len(rest_ids)

    try:
        for path, batch in iter_parquet_batches(glob, STAGE_COLUMNS, what):
            if not files or files[-1] != path:
                files.append(path)
            ids = batch.column("item_id").cast(pa.string())
            if ids.null_count:
                raise ValueError(f"{what} {path}: column 'item_id' has {ids.null_count} nulls")
            emb_col = batch.column("embedding")
            if pa.types.is_fixed_size_list(emb_col.type):
                d = emb_col.type.list_size
                if d not in dims:
                    dims[d] = path
                if len(dims) > 1:
                    raise ValueError(
                        f"{what} matching {glob!r} mix embedding dimensions "
                        f"{', '.join(f'{k} ({p})' for k, p in sorted(dims.items()))}; match templates of one model"
                    )
            emb = _embedding_matrix(emb_col, path)
            for m in pc.unique(batch.column("model_id")).to_pylist():
                models.setdefault(m, path)
            if len(models) > 1:
                names = sorted(str(m) for m in models)
                raise ValueError(
                    f"{what} come from {len(models)} different models {names[:5]}; embeddings of different "
                    "encoders are not comparable: re-embed with one model"
                )
            _check_rows(emb, ids, path)
            all_ids.append(ids)
            buf_ids.append(ids)
            buf_emb.append(np.asarray(emb, np.float32))
            buffered += len(ids)
            while buffered >= block_size:
                flush(block_size)
        if buffered:
            flush(buffered)
        if all_ids:
            ids = pa.chunked_array(all_ids)
            if pc.count_distinct(ids).as_py() != len(ids):
                counts = pc.value_counts(ids)
                dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"].as_py()
                raise ValueError(f"duplicate item_id {dup!r} in {what}; item ids must be unique")
    except Exception:
        delete_staging(directory)
        raise
    manifest.n = int(sum(block_rows))
    manifest.dim = int(next(iter(dims))) if dims else 0
    manifest.model_id = next(iter(models)) if models else ""
    with FileSystems.create(FileSystems.join(directory, "manifest.json"), mime_type="application/json") as f:
        f.write(json.dumps(manifest.to_json()).encode("utf-8"))
    return manifest


def read_block(manifest: Manifest, block: int) -> tuple[pa.Array, np.ndarray]:
    """(item ids, string (rows,); embeddings float32 (rows, dim), read-only) of one staged block.

    Local blocks are memory-mapped (no copy); remote ones are downloaded whole.
    """
    path = manifest.block_path(block)
    if _is_local(path):
        table = pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
    else:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            table = pa.ipc.open_file(pa.BufferReader(f.read())).read_all()
    emb_col = table.column("embedding").combine_chunks()
    emb = emb_col.values.to_numpy(zero_copy_only=False).reshape(-1, manifest.dim)
    return table.column("item_id").combine_chunks(), emb


class BlockCache:
    """The last few blocks read, per worker (tasks of one strip reuse the left block)."""

    def __init__(self, manifest: Manifest, size: int = 3):
        self.manifest = manifest
        self.size = size
        self._blocks: dict[int, tuple[pa.Array, np.ndarray]] = {}

    def get(self, block: int) -> tuple[pa.Array, np.ndarray]:
        if block in self._blocks:
            value = self._blocks.pop(block)
        else:
            value = read_block(self.manifest, block)
            while len(self._blocks) >= self.size:
                self._blocks.pop(next(iter(self._blocks)))
        self._blocks[block] = value
        return value


def block_of_rows(manifest: Manifest, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(block, row within block) of global rows (every block but the last holds block_size rows)."""
    rows = np.asarray(rows, np.int64)
    return rows // manifest.block_size, rows % manifest.block_size


def read_rows(manifest: Manifest, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Item ids and embeddings (len(rows), dim) of the given global rows, in that order."""
    rows = np.asarray(rows, np.int64)
    emb = np.empty((len(rows), manifest.dim), np.float32)
    ids: list[str | None] = [None] * len(rows)
    blocks, within = block_of_rows(manifest, rows)
    for b in np.unique(blocks).tolist():
        sel = np.flatnonzero(blocks == b)
        block_ids, block_emb = read_block(manifest, b)
        emb[sel] = block_emb[within[sel]]
        taken = block_ids.take(pa.array(within[sel])).to_pylist()
        for k, item in zip(sel.tolist(), taken):
            ids[k] = item
    return ids, emb


def all_item_ids(manifest: Manifest) -> pa.Array:
    """Every staged item id in row order (one string column, ~n * (id length + 4) bytes)."""
    if not manifest.num_blocks:
        return pa.array([], pa.string())
    return pa.concat_arrays([read_block(manifest, b)[0] for b in range(manifest.num_blocks)])


def delete_staging(directory: str) -> None:
    """Delete the files directly under the staging `directory` (blocks, manifest, samples) and the directory."""
    paths = match_paths(FileSystems.join(directory, "*"))
    if paths:
        FileSystems.delete(paths)
    if _is_local(directory):
        import os

        for d in (directory, os.path.dirname(directory.rstrip("/"))):
            try:
                os.rmdir(d)  # only when empty: never anything the stage did not write
            except OSError:
                pass


def write_partition_slices(path: str, partitions: list[int], batches: list[pa.RecordBatch]) -> None:
    """Write one block's members of each partition as the record batches of one Arrow IPC file.

    Batch k holds the members of `partitions[k]`; a partition task reads back only its own batch of each
    block's file (`read_partition_slice`), so the members travel through files, not the runner's shuffle:
    what the shuffle carries is (partition, block, batch index), a few bytes per slice.
    """
    if not batches:
        return
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
    with FileSystems.create(path, mime_type="application/octet-stream") as f:
        f.write(sink.getvalue().to_pybytes())


def read_partition_slice(path: str, index: int) -> pa.RecordBatch:
    """Record batch `index` of a file written by `write_partition_slices` (local files: memory-mapped, so
    only that batch's pages are read)."""
    if _is_local(path):
        return pa.ipc.open_file(pa.memory_map(path, "r")).get_batch(index)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return pa.ipc.open_file(pa.BufferReader(f.read())).get_batch(index)
