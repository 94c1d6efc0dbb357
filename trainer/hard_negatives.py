"""Hard negatives: pairs of images a person confirmed are NOT copies although a model scored them high
(`siamese-dedup review import` writes them), read for `train --hard_negatives FILE`.

The file (the contract, FORMAT_HELP): CSV or Parquet, told apart by the extension (.csv / .parquet), local
or gs:// (Beam's FileSystems), with columns `left_uri`, `right_uri` (the two images, local or gs://) and
optionally `left_id`, `right_id`, `score`, `label`. With a `label` column only rows labelled `distinct`
are used; the others are counted as skipped.

Both images of a pair are read like the embed stage reads files (beam_pipeline.sources.read_file) and
decoded with siamese_core.decode.decode_image to the model's input spec, as every training image is
(trainer.data), so training sees what embed will feed the model. A row whose image cannot be read or
decoded is skipped and counted under its reason; the counts go to the model card. Training then puts the
pairs' images in every batch as separate identities (trainer.samplers.PairedInstanceSampler), so the
in-batch loss pushes the two images of each pair apart.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import sys

import numpy as np

REQUIRED_COLUMNS = ("left_uri", "right_uri")
OPTIONAL_COLUMNS = ("left_id", "right_id", "score", "label")
DISTINCT = "distinct"
FORMAT_HELP = ("CSV or Parquet (.csv / .parquet) with columns left_uri, right_uri (image paths, local or gs://) "
               "and optional left_id, right_id, score, label (with a label column only rows labelled "
               "'distinct' are used)")
# Reasons a row is skipped (the model card's hard_negatives.skipped keys); a decode failure is "decode "
# + siamese_core.decode's reason (truncated, corrupt, not_an_image, ...), a label other than distinct
# "label " + the label.
MISSING_URI = "missing uri"
SAME_IMAGE = "same image"        # one URI on both sides, or two files that decode to the same pixels
DUPLICATE_PAIR = "duplicate pair"  # the pair (either way round) was given before
UNREADABLE = "unreadable"
SHOWN_EXAMPLES = 5


@dataclasses.dataclass
class PairTable:
    """The rows of a hard-negatives file: `left`, `right` URIs and `labels` (None without a label column),
    each a list with one entry per row, in file order."""
    path: str
    left: list[str]
    right: list[str]
    labels: list[str] | None

    def __len__(self) -> int:
        return len(self.left)


@dataclasses.dataclass
class HardNegatives:
    """The usable pairs, decoded.

    images: uint8 (m, H, W, C), the distinct images of the pairs at the input spec (an image in several
      pairs is one row). sources: the same images at the edit source spec (copy edits), else None.
    pairs: int64 (p, 2), rows of `images`, one pair a line. record: what the model card records,
      {"file", "pairs_given", "pairs_used", "skipped": {reason: count}}; pairs_given = pairs_used + skipped.
    """
    images: np.ndarray
    sources: np.ndarray | None
    pairs: np.ndarray
    record: dict


def _read_bytes(path: str) -> bytes:
    """The whole file at `path` (local or any Beam filesystem); OSError when it cannot be read."""
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    if FileSystems.get_scheme(path) is None:
        with open(path, "rb") as f:
            return f.read()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def _csv_columns(data: bytes, path: str) -> dict[str, list]:
    """{column: values} of CSV bytes with a header line (utf-8, a BOM tolerated)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"hard negatives {path}: not UTF-8 text ({err})") from None
    reader = csv.DictReader(io.StringIO(text))
    names = [n.strip() for n in reader.fieldnames or []]
    rows = list(reader)
    return {name: [row.get(raw) for row in rows] for name, raw in zip(names, reader.fieldnames or [])}


def _parquet_columns(data: bytes, path: str) -> dict[str, list]:
    """{column: values} of a Parquet file's bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"hard negatives {path}: not a Parquet file ({err})") from None
    return {name: table.column(name).to_pylist() for name in table.column_names}


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def read_pair_table(path: str) -> PairTable:
    """Read a hard-negatives file (the contract in the module docstring). Cheap: no image is read.

    Raises ValueError for an extension other than .csv / .parquet, a missing required column or a file
    without rows, OSError when the file cannot be read.
    """
    lower = path.lower()
    if not lower.endswith((".csv", ".parquet")):
        raise ValueError(f"hard negatives {path}: the file must end in .csv or .parquet ({FORMAT_HELP})")
    try:
        data = _read_bytes(path)
    except OSError as err:  # Beam's filesystems raise their own OSError subclasses
        raise OSError(f"hard negatives {path}: cannot read the file ({err})") from None
    columns = _csv_columns(data, path) if lower.endswith(".csv") else _parquet_columns(data, path)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"hard negatives {path}: no column {', '.join(missing)} (it has "
                         f"{', '.join(columns) or 'none'}; {FORMAT_HELP})")
    left, right = ([_text(v) for v in columns[c]] for c in REQUIRED_COLUMNS)
    if not left:
        raise ValueError(f"hard negatives {path}: no rows")
    labels = [_text(v) for v in columns["label"]] if "label" in columns else None
    return PairTable(path, left, right, labels)


def _digest(pixels: np.ndarray) -> bytes:
    """A key of an image's pixels: equal keys mean the same pixels. Bytes only, so (H, W) and (H, W, 1)
    arrays of one grey image agree (Fashion-MNIST's training arrays have no channel axis)."""
    return hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest()


class _Decoder:
    """Reads and decodes each URI once (an image may be in several pairs); identical pixels share a row.

    `image(uri)` returns the row of the decoded image in `images` or the reason it cannot be used.
    """

    def __init__(self, input_spec: dict, source_spec: dict | None):
        self.input_spec, self.source_spec = input_spec, source_spec
        self.images: list[np.ndarray] = []
        self.sources: list[np.ndarray] = []
        self._rows: dict[bytes, int] = {}
        self._done: dict[str, int | str] = {}

    def image(self, uri: str) -> int | str:
        if uri not in self._done:
            self._done[uri] = self._decode(uri)
        return self._done[uri]

    def _decode(self, uri: str) -> int | str:
        from siamese_core.decode import DecodeError, decode_image
        from beam_pipeline.sources import Record, read_file
        record = read_file(uri, uri)
        if not isinstance(record, Record):
            return UNREADABLE
        try:
            pixels = decode_image(record.data, self.input_spec).pixels
            source = decode_image(record.data, self.source_spec).pixels if self.source_spec else None
        except DecodeError as err:
            return f"decode {err.reason}"
        key = _digest(pixels)
        if key not in self._rows:
            self._rows[key] = len(self.images)
            self.images.append(pixels)
            if source is not None:
                self.sources.append(source)
        return self._rows[key]


def _pair_rows(table: PairTable, decoder: _Decoder) -> tuple[list[tuple[int, int]], collections.Counter, list]:
    """(usable pairs as decoder rows, skipped {reason: count}, (row number, reason, URI) examples)."""
    pairs, seen, skipped, examples = [], set(), collections.Counter(), []
    for i, (left, right) in enumerate(zip(table.left, table.right)):
        label = table.labels[i] if table.labels is not None else DISTINCT
        reason, uri = None, ""
        if label.lower() != DISTINCT:
            reason = f"label {label or '(empty)'}"
        elif not left or not right:
            reason = MISSING_URI
        elif left == right:
            reason = SAME_IMAGE
        else:
            rows = []
            for uri in (left, right):
                got = decoder.image(uri)
                if isinstance(got, str):
                    reason = got
                    break
                rows.append(got)
            if reason is None:
                uri = ""
                key = tuple(sorted(rows))
                reason = SAME_IMAGE if rows[0] == rows[1] else DUPLICATE_PAIR if key in seen else None
                if reason is None:
                    seen.add(key)
                    pairs.append((rows[0], rows[1]))
        if reason is not None:
            skipped[reason] += 1
            if len(examples) < SHOWN_EXAMPLES and not reason.startswith("label "):
                examples.append((i + 1, reason, uri))
    return pairs, skipped, examples


def load_hard_negatives(table: PairTable, input_spec: dict, source_spec: dict | None = None) -> HardNegatives:
    """Decode the images of a PairTable's usable rows.

    input_spec: the model's input spec (decode size, channels, border trimming); source_spec: the spec of
    the copy edits' source images (trainer.train.edit_source_spec), or None. Rows that cannot be used are
    counted in record["skipped"] and a few are named in a warning on stderr. Raises ValueError when no row
    is usable.
    """
    decoder = _Decoder(input_spec, source_spec)
    pairs, skipped, examples = _pair_rows(table, decoder)
    record = {"file": table.path, "pairs_given": len(table), "pairs_used": len(pairs),
              "skipped": dict(sorted(skipped.items()))}
    if examples:
        shown = "; ".join(f"row {n}: {reason}{f' ({uri})' if uri else ''}" for n, reason, uri in examples)
        print(f"warning: hard negatives {table.path}: skipped {sum(skipped.values())} of {len(table)} pairs "
              f"{record['skipped']}: {shown}{' ...' if sum(skipped.values()) > len(examples) else ''}",
              file=sys.stderr)
    if not pairs:
        raise ValueError(f"hard negatives {table.path}: none of its {len(table)} pairs is usable "
                         f"(skipped: {record['skipped']})")
    images = np.stack(decoder.images)
    sources = np.stack(decoder.sources) if source_spec else None
    return HardNegatives(images, sources, np.asarray(pairs, np.int64).reshape(-1, 2), record)


def place_in(train_images: np.ndarray, hard: HardNegatives) -> tuple[np.ndarray, np.ndarray]:
    """Where the hard-negative images go in the training set: (rows of hard.images that are new training
    items, appended after the `n` training images in that order; the pairs as int64 (p, 2) indices into the
    training set so extended).

    An image whose pixels equal a training image's (the usual case: the pairs come from the catalogue
    being trained on) is that training item, not a second identity of the same pixels, which the loss
    would try to push away from itself.
    """
    n = len(train_images)
    wanted = {_digest(img): j for j, img in enumerate(hard.images)}
    position = np.full(len(hard.images), -1, np.int64)
    for i, img in enumerate(train_images):
        j = wanted.get(_digest(img))
        if j is not None and position[j] < 0:
            position[j] = i
    new = np.flatnonzero(position < 0)
    position[new] = n + np.arange(len(new))
    return new, position[hard.pairs]
