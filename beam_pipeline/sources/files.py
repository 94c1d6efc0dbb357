"""Image files as items: one file, one Record (JPEG, PNG, WebP, BMP, GIF, TIFF, ...).

item_id = the path relative to the glob's prefix (`beam_pipeline.io.item_id_for`); source_uri = the path.
"""
from __future__ import annotations

from typing import IO, Optional, Union

from beam_pipeline import io as bio
from beam_pipeline.sources.record import Record, ReadFailure, describe, open_stream, too_big

# File name extensions of images (lower case); tar shards tell image members from metadata by them.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "dib", "gif", "tif", "tiff", "ppm",
                    "pgm", "pbm", "pnm")


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
    over = too_big(size, max_bytes, "file") if size is not None else None
    if over:
        return ReadFailure(item_id, path, over)
    try:
        # UNCOMPRESSED: the bytes of 'x.png.gz' are the file's bytes, not a gunzipped stream. Local files
        # skip FileSystems' dispatch, a noticeable share of the cost of a small file. (Not read(max + 1):
        # that allocates the whole limit for every file.)
        with (open(path, "rb") if bio._is_local(path) else open_stream(path)) as f:
            data = f.read() if size is not None or not max_bytes else _read_at_most(f, max_bytes + 1)
    except Exception as err:  # filesystems raise their own IOError subclasses
        return ReadFailure(item_id, path, describe(err))
    if max_bytes and len(data) > max_bytes:  # the listing's size was missing or out of date
        return ReadFailure(item_id, path, f"OSError: file of more than {max_bytes} bytes exceeds "
                                          f"--max_file_bytes={max_bytes}")
    return Record(item_id, path, data)
