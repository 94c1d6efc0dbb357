"""The report's numbers of the matched pairs, from a Beam combiner in bounded memory.

However many pairs a run matched, `MatchStats` reads the matches table in Parquet batches and combines
them into
- a histogram of their scores on a fine grid (score_distribution's BINS over the score's range), split into
  pairs the truth calls duplicates and the others when a truth is given (`groups`: {item_id: group});
- the WEAKEST lowest-scoring pairs (for the gallery just above the threshold);
- counts, the lowest and the highest score.
The accumulator is O(BINS + WEAKEST) whatever the number of pairs; the truth is a side input of one entry
per item of the truth (not per pair).

    stats = match_stats.compute(matches_glob, score="angular_similarity", groups=None)
"""
from __future__ import annotations

import heapq
import os
import pickle
import tempfile

import apache_beam as beam
import numpy as np
import pyarrow as pa

from beam_pipeline import runner
from beam_pipeline.score_distribution import BINS, SCORE_RANGES

WEAKEST = 12
COLUMNS = ["left_id", "right_id", "score"]


def _empty(bins: int) -> dict:
    return {"counts": np.zeros(bins, np.int64), "genuine": np.zeros(bins, np.int64), "pairs": 0,
            "low": np.inf, "high": -np.inf, "weakest": []}


class MatchStatsFn(beam.CombineFn):
    """Combines batches {"score": float32 (k,), "genuine": bool (k,) or None, "left_id", "right_id": lists}
    into {"edges", "counts", "genuine_counts", "pairs", "low", "high", "weakest": [(score, left, right)]}."""

    def __init__(self, score: str = "angular_similarity", bins: int = BINS, weakest: int = WEAKEST):
        self._edges = np.linspace(*SCORE_RANGES[score], bins + 1)
        self._weakest = weakest

    def create_accumulator(self):
        return _empty(len(self._edges) - 1)

    def add_input(self, acc, batch):
        s = np.asarray(batch["score"], np.float64)
        if not len(s):
            return acc
        bins = np.clip(np.searchsorted(self._edges, s, side="right") - 1, 0, len(self._edges) - 2)
        acc["counts"] += np.bincount(bins, minlength=len(acc["counts"]))
        if batch.get("genuine") is not None:
            acc["genuine"] += np.bincount(bins[np.asarray(batch["genuine"], bool)], minlength=len(acc["counts"]))
        acc["pairs"] += len(s)
        acc["low"], acc["high"] = min(acc["low"], float(s.min())), max(acc["high"], float(s.max()))
        low = np.argpartition(s, min(self._weakest, len(s)) - 1)[:self._weakest]
        acc["weakest"] = heapq.nsmallest(self._weakest, acc["weakest"] + [
            (float(s[k]), batch["left_id"][k], batch["right_id"][k]) for k in low])
        return acc

    def merge_accumulators(self, accumulators):
        out = self.create_accumulator()
        for acc in accumulators:
            out["counts"] += acc["counts"]
            out["genuine"] += acc["genuine"]
            out["pairs"] += acc["pairs"]
            out["low"], out["high"] = min(out["low"], acc["low"]), max(out["high"], acc["high"])
            out["weakest"] = heapq.nsmallest(self._weakest, out["weakest"] + acc["weakest"])
        return out

    def extract_output(self, acc):
        return {"edges": self._edges, "counts": acc["counts"], "genuine_counts": acc["genuine"],
                "pairs": acc["pairs"], "low": None if not acc["pairs"] else acc["low"],
                "high": None if not acc["pairs"] else acc["high"], "weakest": acc["weakest"]}


def _batch_arrays(batch: pa.RecordBatch, groups: dict | None) -> dict:
    """A matches batch as the combiner's input; genuine = both items in one truth group."""
    left, right = batch.column("left_id").to_pylist(), batch.column("right_id").to_pylist()
    genuine = None
    if groups is not None:
        genuine = np.fromiter((groups.get(a, ("L", a)) == groups.get(b, ("R", b)) for a, b in zip(left, right)),
                              bool, len(left))
    return {"score": batch.column("score").to_numpy(), "genuine": genuine, "left_id": left, "right_id": right}


def expand(matches_glob: str, score: str, groups: dict | None):
    """The PTransform chain: read the matches in Parquet batches, combine (one output element)."""
    def transform(p):
        batches = p | "ReadMatches" >> beam.io.ReadFromParquetBatched(matches_glob, columns=COLUMNS)
        if groups is None:
            arrays = batches | "Arrays" >> beam.Map(_batch_arrays, None)
        else:
            truth = p | "Truth" >> beam.Create([groups])
            arrays = batches | "Arrays" >> beam.Map(_batch_arrays, beam.pvalue.AsSingleton(truth))
        return arrays | "Combine" >> beam.CombineGlobally(MatchStatsFn(score))
    return transform


def _write_pickle(stats: dict, path: str) -> None:
    with open(path, "wb") as f:
        pickle.dump(stats, f)


def compute(matches_glob: str, *, score: str = "angular_similarity", groups: dict | None = None) -> dict:
    """Run the combiner over the matches on the local runner; its output dict. The one output element
    comes back through a temporary file (the runner pickles what the pipeline's functions capture)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stats.pickle")
        options = PipelineOptions(["--direct_num_workers", "1"])
        p = runner.new_pipeline(options)
        out = expand(matches_glob, score, groups)(p)
        out | "Write" >> beam.Map(_write_pickle, path)
        runner.run(p, options)
        with open(path, "rb") as f:
            return pickle.load(f)


def display_histogram(stats: dict, low: float, high: float, bins: int, of: str) -> dict:
    """The fine histogram merged into `bins` equal bins over [low, high] for report.json's
    similarity_histogram: {"bin_edges", "counts", "genuine_counts", "of"} (fine bins are assigned by their
    left edge; the fine grid is 1/BINS of the score's range, far finer than the display)."""
    edges = np.linspace(low, high, bins + 1) if high > low else np.array([low, low + 1e-6])
    fine_left = stats["edges"][:-1]
    # Fine bins below `low` hold no matched pair except float32 round-off at the threshold: count them in
    # the first display bin.
    at = np.clip(np.searchsorted(edges, fine_left + 1e-12, side="right") - 1, 0, len(edges) - 2)
    counts = np.bincount(at, weights=stats["counts"], minlength=len(edges) - 1).astype(np.int64)
    genuine = np.bincount(at, weights=stats["genuine_counts"], minlength=len(edges) - 1).astype(np.int64)
    return {"bin_edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
            "genuine_counts": [int(c) for c in genuine], "of": of}
