"""What every reader of a catalogue yields, and the small helpers the formats share.

A reader turns a file or shard into `Record`s (an item's bytes) and `ReadFailure`s (an item, or the
unreadable rest of a shard, with why): every item is one or the other, never a silent gap.
"""
from __future__ import annotations

import dataclasses
from typing import IO, NamedTuple, Optional, Sequence

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

# The largest file, record or member read (embed's --max_file_bytes default; the report's thumbnails).
DEFAULT_MAX_FILE_BYTES = 200_000_000
# Field names tried, in order, when --image_key / --id_key is not given (TFRecord features, Parquet columns).
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


def describe(err: BaseException) -> str:
    """A failures row's error: '<exception type>: <message>', at most 2000 characters."""
    return f"{type(err).__name__}: {err}"[:2000]


def open_stream(path: str, compression: str = CompressionTypes.UNCOMPRESSED) -> IO[bytes]:
    """A binary stream of `path` on any filesystem Beam knows (local, gs://, ...)."""
    return FileSystems.open(path, compression_type=compression)


def as_text(value) -> str:
    """An id or label field as text: bytes decoded as UTF-8 (bad bytes replaced), anything else str()."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def too_big(size: int, max_bytes: int, what: str) -> Optional[str]:
    """The error of a `what` ('file', 'image', 'member') of `size` bytes over `max_bytes` (0: no limit),
    else None."""
    if max_bytes and size > max_bytes:
        return f"OSError: {what} of {size} bytes exceeds --max_file_bytes={max_bytes}"
    return None


def pick(fields: dict, wanted: Optional[str], candidates: Sequence[str], what: str) -> Optional[str]:
    """The field name to use: `wanted` if given (KeyError if absent), else the first candidate present."""
    if wanted is not None:
        if wanted not in fields:
            raise KeyError(f"no {what} field {wanted!r} (fields: {sorted(fields)[:20]})")
        return wanted
    return next((c for c in candidates if c in fields), None)
