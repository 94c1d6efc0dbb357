"""The catalogue formats, and `ReadCatalogue`: the one PTransform that reads a catalogue of any of them.

The valid formats (`FORMATS`, embed's --input_format besides 'auto') and the path suffixes that imply them
are defined here; each format's reader is in its own module (files, tfrecord, parquet, tar). The DoFns
are thin: they count, tag failures, and call the pure readers.
"""
from __future__ import annotations

import typing
from typing import Iterable, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.io import fileio

from beam_pipeline import io as bio
from beam_pipeline import runner
from beam_pipeline.sources import listing, parquet, tar, tfrecord
from beam_pipeline.sources.files import read_file
from beam_pipeline.sources.record import ReadFailure, Record, RecordKeys, describe

FAILURES_TAG = "failures"

# The formats whose files a path suffix names; any other path is an image file ('files').
_FORMAT_SUFFIXES = (("tfrecord", tfrecord.SUFFIXES), ("parquet", parquet.SUFFIXES), ("tar", tar.SUFFIXES))
FORMATS = ("files",) + tuple(fmt for fmt, _ in _FORMAT_SUFFIXES)
# Shards read front to back by one worker: format -> reader (path, shard id, keys, max bytes) -> items.
_SHARD_READERS = {"tfrecord": tfrecord.tfrecord_shard_records, "tar": tar.tar_shard_records}
# Image files travel to the readers in groups of this many (one shuffle element each).
FILES_PER_READ = 16


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


class _CountingFn(beam.DoFn):
    """Emits Records on the main output and ReadFailures on FAILURES_TAG, counting items read. Holds what
    the readers below need of ReadCatalogue's settings (each uses its share)."""

    def __init__(self, input_glob: str = "", keys: RecordKeys = RecordKeys(), max_bytes: int = 0):
        self._input_glob = input_glob
        self._keys = keys
        self._max_bytes = max_bytes
        self._items_read, self._read_failed, self._failed = (
            runner.counter(name) for name in ("items_read", "read_failed", "failed"))

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

    def process(self, batch):
        for path, size in batch:
            if listing.is_directory(path):
                continue
            item_id = bio.item_id_for(path, self._input_glob)
            yield from self._emit([read_file(path, item_id, self._max_bytes, None if size < 0 else size)])


class _ReadShardFn(_CountingFn):
    """(path, size) of a TFRecord or tar shard -> the Records (and ReadFailures) in it."""

    def __init__(self, input_glob: str, input_format: str, keys: RecordKeys, max_bytes: int):
        super().__init__(input_glob, keys, max_bytes)
        self._reader = _SHARD_READERS[input_format]

    def process(self, listed):
        path, _ = listed
        if listing.is_directory(path):
            return
        shard_id = bio.item_id_for(path, self._input_glob)
        yield from self._emit(self._reader(path, shard_id, self._keys, self._max_bytes))


class _ParquetRowGroupsFn(_CountingFn):
    """(path, size) of a Parquet file -> (path, shard id, row group, first row) per row group; a file
    whose footer cannot be read is one ReadFailure."""

    def process(self, listed):
        path, _ = listed
        if listing.is_directory(path):
            return
        shard_id = bio.item_id_for(path, self._input_glob)
        try:
            groups = parquet.parquet_row_groups(path)
        except Exception as err:
            yield from self._emit([ReadFailure(shard_id, path, f"{describe(err)} (no readable Parquet footer)")])
            return
        for row_group, first_row, rows in groups:
            if rows:
                yield path, shard_id, row_group, first_row


class _ReadRowGroupFn(_CountingFn):
    """(path, shard id, row group, first row) -> the Records (and ReadFailures) of that row group."""

    def process(self, element):
        path, shard_id, row_group, first_row = element
        yield from self._emit(
            parquet.parquet_row_group_records(path, shard_id, row_group, first_row, self._keys, self._max_bytes))


class _ListLocalFn(_CountingFn):
    """A local glob -> (path, size) of every file it matches; entries that cannot be items (dangling
    links, loops, pipes, devices) -> ReadFailures with the reason (`listing.local_listing`)."""

    def process(self, glob):
        for listed in listing.local_listing(glob):
            if listed.problem is None:
                yield listed.path, listed.size
            else:
                yield from self._emit([ReadFailure(bio.item_id_for(listed.path, self._input_glob), listed.path,
                                                   f"OSError: {listed.problem}")])


class ReadCatalogue(beam.PTransform):
    """Read the catalogue `input_glob` in `input_format` (one of FORMATS) -> (records, failures).

    records: PCollection of Record; failures: PCollection of ReadFailure. Every item read is counted in
    the 'items_read' counter (namespace runner.METRICS_NAMESPACE), failures also in 'read_failed' and 'failed'.
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
            listed = (pbegin
                      | "Glob" >> beam.Create([self._input_glob])
                      | "ListLocal" >> beam.ParDo(_ListLocalFn(self._input_glob)).with_outputs(
                          FAILURES_TAG, main="files"))
            matched, unlisted = listed.files, listed[FAILURES_TAG]
        else:
            matched = (pbegin
                       | "MatchFiles" >> fileio.MatchFiles(self._input_glob)
                       | "Listed" >> beam.Map(listing.path_and_size).with_output_types(typing.Tuple[str, int]))
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
                    | "ReadFiles" >> beam.ParDo(_ReadFileFn(self._input_glob, max_bytes=self._max_bytes)).with_outputs(
                        FAILURES_TAG, main="records"))
            return read.records, read[FAILURES_TAG]
        files = matched | "SpreadFiles" >> beam.Reshuffle()
        if self._format in _SHARD_READERS:
            read = files | "ReadShards" >> beam.ParDo(
                _ReadShardFn(self._input_glob, self._format, self._keys, self._max_bytes)
            ).with_outputs(FAILURES_TAG, main="records")
            return read.records, read[FAILURES_TAG]
        groups = files | "RowGroups" >> beam.ParDo(_ParquetRowGroupsFn(self._input_glob)).with_outputs(
            FAILURES_TAG, main="groups")
        read = (groups.groups
                | "SpreadRowGroups" >> beam.Reshuffle()
                | "ReadRowGroups" >> beam.ParDo(_ReadRowGroupFn(keys=self._keys, max_bytes=self._max_bytes)).with_outputs(
                    FAILURES_TAG, main="records"))
        failures = (groups[FAILURES_TAG], read[FAILURES_TAG]) | "ParquetFailures" >> beam.Flatten()
        return read.records, failures
