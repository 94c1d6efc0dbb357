"""The match pipeline: templates in, pairs at or above the threshold out, in bounded memory.

    siamese-dedup match --templates 'D/templates/*.parquet' --output D --model_dir M
        [--threshold 0.9 | --target_fmr 1e-4 | --target_precision 0.99 | --max_false_pairs 5]
        [--mode all_pairs | queries --queries 'Q/*.parquet' --top_k 10 | pairs --pairs pairs.csv]
        [--search exact | approximate]

1. The driver streams the templates once into blocks (beam_pipeline.blocks: `--block_size` rows per
   Arrow file under the staging directory) and refuses, before any matching, what cannot be matched:
   mixed model_ids or dimensions, NaN or non-unit embeddings, duplicate or null item ids, a model card
   of another model. It resolves the threshold: by default chosen for this catalogue by self-calibration
   (beam_pipeline.self_calibration: the impostor tail from random pairs of the catalogue, synthetic copies
   of its items, a false-pair budget, the estimate with its uncertainty in match_run.json); or given in
   angular similarity, or the card's calibration at --target_fmr. The cosine is stored beside it. With
   kNN score normalisation (--score_norm knn, or the card's choice; beam_pipeline.knn_norm) it first finds
   every item's k-th neighbour, and the threshold cuts the normalised score instead.
2. The pipeline spreads tasks over the workers; each loads only the blocks it needs (a few MiB):
   - all_pairs, exact: strips of block pairs (i, j >= i); each a tiled matrix product keeping only pairs
     with cosine >= threshold (matching.pairs_above_threshold). No N x N matrix exists anywhere.
   - all_pairs, approximate: k-means partitions with multi-assignment (beam_pipeline.candidates): every
     block's items are assigned to partitions and written, partition by partition, to one Arrow file per
     block; the shuffle carries only (partition, file, batch), and each partition task reads its members
     back and compares them within the partition. A sample of
     `--recall_sample` items is also matched exactly against the whole catalogue, and the recall of the
     approximate pairs against it is written to match_run.json and the report.
   - queries (1:N): every query block against every catalogue block; per query the `--top_k` pairs of
     highest similarity at or above the threshold (0: all of them).
   - pairs (1:1 verification): the given pairs, grouped by the blocks of their two items; every pair's
     similarity goes to D/verifications/, those at or above the threshold to the matches.
3. Matches (left_id < right_id, cosine, angular_similarity, model_id, run_id) are written to
   D/matches/matches-*.parquet, each shard carrying its lineage (beam_pipeline.outputs: the templates'
   fingerprint, the threshold); the driver writes D/match_run.json (schemas.documents.MATCH_RUN_SCHEMA,
   checked before it is written). Everything is written into the run's staging area and published into D
   when the run has finished; clusters and reports in D made from earlier matches are moved aside to
   D/stale/.

Each mode's transforms are added by its builder (`BUILDERS`, whose keys are the valid --mode values;
all_pairs picks by --search in `ALL_PAIRS_SEARCHES`); `run` stages, chooses the threshold and runs one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Callable, NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beam_pipeline import blocks as bk
from beam_pipeline import candidates, knn_norm, matching
from beam_pipeline import io as bio
from beam_pipeline import outputs, runner
from beam_pipeline.options import MatchOptions, new_run_id, parse_stage_options
from beam_pipeline.thresholds import angular_cut, knn_cut, resolve_threshold, threshold_method
from siamese_core.artefact import load_model_card
from schemas.documents import validate_match_run
from schemas.tables import MATCHES_SCHEMA, SAMPLE_PAIRS_SCHEMA, VERIFICATIONS_SCHEMA, embeddings_as_numpy
from siamese_core.similarity import angular_similarity

LOG = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- tables

def matches_table(left_ids, right_ids, cos: np.ndarray, model_id: str, run_id: str,
                  score: np.ndarray | None = None) -> pa.Table:
    """Matches rows (MATCHES_SCHEMA) for pairs of item ids, oriented left_id < right_id.

    `left_ids` / `right_ids` are string arrays (pyarrow or sequences) of equal length; `score` what the
    threshold cut (default: the angular similarity itself).
    """
    a = pa.array(left_ids, pa.string()) if not isinstance(left_ids, pa.Array) else left_ids
    b = pa.array(right_ids, pa.string()) if not isinstance(right_ids, pa.Array) else right_ids
    k = len(a)
    if k:
        swap = pc.less(b, a)
        left, right = pc.if_else(swap, b, a), pc.if_else(swap, a, b)
    else:
        left, right = a, b
    # Dot products of unit float32 vectors can overshoot +-1 by an ulp; store the cosine in range.
    cos = np.clip(np.asarray(cos, np.float32), np.float32(-1), np.float32(1))
    angular = angular_similarity(cos).reshape(k)
    return pa.table(
        {
            "left_id": left,
            "right_id": right,
            "cosine": pa.array(cos, pa.float32()),
            "angular_similarity": pa.array(angular, pa.float32()),
            "score": pa.array(angular if score is None else np.asarray(score, np.float32).reshape(k), pa.float32()),
            "model_id": pa.array([model_id] * k, pa.string()),
            "run_id": pa.array([run_id] * k, pa.string()),
        },
        schema=MATCHES_SCHEMA,
    )


def match_queries_in_process(queries: pa.Table, catalogue: pa.Table, cos_threshold: float, model_id: str,
                             run_id: str) -> pa.Table:
    """`--mode queries --top_k 0` of two templates tables in memory, without a pipeline (a nightly delta):
    every (query, catalogue item) pair with cosine >= `cos_threshold` by the same kernel
    (matching.pairs_above_threshold), an item never with itself. A matches table (MATCHES_SCHEMA, pairs
    oriented left_id < right_id); a pair of two queries that are also catalogue items comes twice, as
    the pipeline writes it (nightly.merge_matches keeps one)."""
    q_ids = queries.column("item_id").combine_chunks()
    c_ids = catalogue.column("item_id").combine_chunks()
    i, j, cos = matching.pairs_above_threshold(embeddings_as_numpy(queries), embeddings_as_numpy(catalogue),
                                               cos_threshold, same_block=False, threads=matching.default_threads())
    left, right = _take(q_ids, i), _take(c_ids, j)
    other = pc.invert(pc.equal(left, right)) if len(i) else pa.array([], pa.bool_())
    return matches_table(left.filter(other), right.filter(other), cos[other.to_numpy(zero_copy_only=False)],
                         model_id, run_id)


def _take(ids: pa.Array, rows: np.ndarray) -> pa.Array:
    return ids.take(pa.array(np.asarray(rows, np.int64)))


# ------------------------------------------------------------------------------------------- tasks

def exact_strips(num_blocks: int, strip: int) -> list[tuple[int, int, int]]:
    """Tasks (i, j0, j1): block i against blocks j0 <= j < j1, j >= i; together every block pair once."""
    out = []
    for i in range(num_blocks):
        for j0 in range(i, num_blocks, strip):
            out.append((i, j0, min(num_blocks, j0 + strip)))
    return out


def strip_width(num_blocks: int, min_tasks: int = 64) -> int:
    """Blocks per strip: long strips reuse the left block, but keep >= `min_tasks` tasks to spread."""
    pairs = num_blocks * (num_blocks + 1) // 2
    return max(1, min(16, pairs // max(1, min_tasks)))


class _BlockDoFn(beam.DoFn):
    def __init__(self, manifest: dict, cos_threshold: float, model_id: str, run_id: str, threads: int):
        self._manifest_doc = manifest
        self._cos = cos_threshold
        self._model_id = model_id
        self._run_id = run_id
        self._threads = threads
        self._pairs = runner.counter("pairs")
        self._products = runner.counter("products")

    def setup(self):
        self._cache = bk.BlockCache(bk.Manifest.from_json(self._manifest_doc))


class ExactStripFn(_BlockDoFn):
    """(i, j0, j1) -> one matches Table of the pairs above threshold between block i and blocks j0..j1-1.

    With `knn` = (b of every row, beta, threshold on the normalised score), pairs are cut on that score
    (knn_norm.pairs_above_score) instead of on the cosine."""

    def __init__(self, manifest, cos_threshold, model_id, run_id, threads, knn=None):
        super().__init__(manifest, cos_threshold, model_id, run_id, threads)
        self._knn = knn

    def _block_pairs(self, bi, bj, emb_i, emb_j, same):
        if self._knn is None:
            i, j, cos = matching.pairs_above_threshold(emb_i, emb_i if same else emb_j, self._cos,
                                                       same_block=same, threads=self._threads, check=False)
            return i, j, cos, None
        b, beta, threshold = self._knn
        size = self._cache.manifest.block_size
        b_i, b_j = (b[slice(*matching.block_bounds(block, len(b), size))] for block in (bi, bj))
        return knn_norm.pairs_above_score(emb_i, emb_i if same else emb_j, b_i, b_j, threshold, beta,
                                          same_block=same, threads=self._threads)

    def process(self, task):
        bi, j0, j1 = task
        ids_i, emb_i = self._cache.get(bi)
        lefts, rights, coss, scores = [], [], [], []
        for bj in range(j0, j1):
            ids_j, emb_j = (ids_i, emb_i) if bj == bi else self._cache.get(bj)
            same = bi == bj
            i, j, cos, score = self._block_pairs(bi, bj, emb_i, emb_j, same)
            n_i, n_j = len(emb_i), len(emb_j)
            self._products.inc(n_i * (n_i - 1) // 2 if same else n_i * n_j)
            if len(i):
                lefts.append(_take(ids_i, i))
                rights.append(_take(ids_j, j))
                coss.append(cos)
                scores.append(score)
        if lefts:
            table = matches_table(pa.concat_arrays(lefts), pa.concat_arrays(rights), np.concatenate(coss),
                                  self._model_id, self._run_id,
                                  None if self._knn is None else np.concatenate(scores))
            self._pairs.inc(table.num_rows)
            yield table


class QueryStripFn(_BlockDoFn):
    """(query block, c0, c1) -> (query block, (query rows, catalogue ids, query ids, cos)) per strip,
    at most top_k per query row."""

    def __init__(self, manifest, query_manifest, cos_threshold, model_id, run_id, threads, top_k):
        super().__init__(manifest, cos_threshold, model_id, run_id, threads)
        self._query_doc = query_manifest
        self._top_k = top_k

    def setup(self):
        super().setup()
        self._queries = bk.BlockCache(bk.Manifest.from_json(self._query_doc), size=2)

    def process(self, task):
        qb, c0, c1 = task
        q_ids, q_emb = self._queries.get(qb)
        bs = self._cache.manifest.block_size
        rows, grows, others, cos_all = [], [], [], []
        for cb in range(c0, c1):
            c_ids, c_emb = self._cache.get(cb)
            i, j, cos = matching.pairs_above_threshold(q_emb, c_emb, self._cos, same_block=False,
                                                       threads=self._threads, check=False)
            self._products.inc(len(q_emb) * len(c_emb))
            if not len(i):
                continue
            same_item = pc.equal(_take(q_ids, i), _take(c_ids, j)).to_numpy(zero_copy_only=False)
            keep = ~same_item  # an item that is both query and catalogue item never matches itself
            # Catalogue rows as global indices, so ties break the same way in every strip and the merge.
            i, g, cos = matching.top_k_per_row(i[keep], j[keep] + cb * bs, cos[keep], self._top_k)
            rows.append(i)
            grows.append(g)
            others.append(_take(c_ids, g - cb * bs))
            cos_all.append(cos)
        if rows:
            yield qb, (np.concatenate(rows), np.concatenate(grows), pa.concat_arrays(others),
                       np.concatenate(cos_all))


class MergeQueryBlockFn(beam.DoFn):
    """(query block, partial results of every strip) -> matches Table of the top_k per query."""

    def __init__(self, query_manifest: dict, model_id: str, run_id: str, top_k: int):
        self._query_doc = query_manifest
        self._model_id = model_id
        self._run_id = run_id
        self._top_k = top_k

    def setup(self):
        self._queries = bk.BlockCache(bk.Manifest.from_json(self._query_doc), size=1)

    def process(self, element):
        qb, parts = element
        parts = list(parts)
        rows = np.concatenate([p[0] for p in parts])
        grows = np.concatenate([p[1] for p in parts])
        ids = pa.concat_arrays([p[2] for p in parts])
        cos = np.concatenate([p[3] for p in parts])
        i, j, c = matching.top_k_per_row(rows, grows, cos, self._top_k)
        # Map each kept catalogue row back to its id (rows are unique per catalogue item).
        position = {g: k for k, g in enumerate(grows.tolist())}
        other = ids.take(pa.array([position[g] for g in j.tolist()], pa.int64()))
        q_ids = self._queries.get(qb)[0]
        yield matches_table(_take(q_ids, i), other, c, self._model_id, self._run_id)


def _dedupe_tables(tables, model_id: str, run_id: str):
    """Matches tables -> one table without repeated (left_id, right_id) (1:N with overlapping sets)."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return
    t = pa.concat_tables(tables)
    t = t.group_by(["left_id", "right_id"]).aggregate([("cosine", "max")]).rename_columns(
        ["left_id", "right_id", "cosine"])
    t = t.sort_by([("left_id", "ascending"), ("right_id", "ascending")])
    yield matches_table(t.column("left_id").combine_chunks(), t.column("right_id").combine_chunks(),
                        t.column("cosine").to_numpy(), model_id, run_id)


def _verified_matches(table: pa.Table) -> pa.Table:
    """The matched rows of a verifications table, as matches (their score is the angular similarity)."""
    t = table.filter(table.column("is_match"))
    return pa.table({name: t.column("angular_similarity" if name == "score" else name)
                     for name in MATCHES_SCHEMA.names}, schema=MATCHES_SCHEMA)


class VerifyPairsFn(_BlockDoFn):
    """((block a, block b), (row a, row b) arrays) -> verification Table of those pairs."""

    def process(self, element):
        (ba, bb), (ra, rb) = element
        ids_a, emb_a = self._cache.get(ba)
        ids_b, emb_b = self._cache.get(bb)
        cos = np.clip(matching.pair_cosines(emb_a[ra], emb_b[rb]), np.float32(-1), np.float32(1))
        t = matches_table(_take(ids_a, ra), _take(ids_b, rb), cos, self._model_id, self._run_id).drop(["score"])
        threshold = matching.float32_threshold(self._cos)
        yield t.append_column(pa.field("is_match", pa.bool_(), nullable=False), pa.array(cos >= threshold))


class AssignBlockFn(_BlockDoFn):
    """block -> (partition, (block, batch index)) for every partition its items are assigned to.

    The members themselves (global row, item id, embedding, assignments) go to one Arrow file per block
    under `slices_dir`, one record batch per partition: memory stays at one block per task whatever the
    runner, and a partition task reads back only its own slices.
    """

    def __init__(self, manifest, cos_threshold, model_id, run_id, threads, centroids, max_assign, slices_dir):
        super().__init__(manifest, cos_threshold, model_id, run_id, threads)
        self._centroids = centroids
        self._max_assign = max_assign
        self._slices_dir = slices_dir
        self._capped = runner.counter("capped_items")
        self._assignments = runner.counter("assignments")

    def process(self, block):
        ids, emb = self._cache.get(block)
        assign, capped, _ = candidates.assign_partitions(emb, self._centroids, self._cos, self._max_assign)
        self._capped.inc(int(capped.sum()))
        rows = np.arange(len(emb), dtype=np.int64) + block * self._cache.manifest.block_size
        flat_p = assign.reshape(-1)
        flat_r = np.repeat(np.arange(len(emb)), assign.shape[1])
        valid = flat_p >= 0
        flat_p, flat_r = flat_p[valid], flat_r[valid]
        self._assignments.inc(len(flat_p))
        order = np.argsort(flat_p, kind="stable")
        flat_p, flat_r = flat_p[order], flat_r[order]
        starts = np.r_[0, np.flatnonzero(flat_p[1:] != flat_p[:-1]) + 1, len(flat_p)]
        partitions, batches = [], []
        d, m = emb.shape[1], assign.shape[1]
        for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
            r = flat_r[a:b]
            partitions.append(int(flat_p[a]))
            batches.append(pa.record_batch({
                "row": pa.array(rows[r]),
                "item_id": _take(ids, r),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(emb[r]).reshape(-1)), d),
                "assign": pa.FixedSizeListArray.from_arrays(pa.array(assign[r].reshape(-1)), m),
            }))
        path = bk.FileSystems.join(self._slices_dir, f"slices-{block:05d}.arrow")
        bk.write_partition_slices(path, partitions, batches)
        for k, partition in enumerate(partitions):
            yield partition, (path, k)


class PartitionMatchFn(beam.DoFn):
    """(partition, its slices in the blocks' files) -> matches Table of the pairs found within it."""

    def __init__(self, cos_threshold: float, model_id: str, run_id: str, threads: int):
        self._cos = cos_threshold
        self._model_id = model_id
        self._run_id = run_id
        self._threads = threads
        self._products = runner.counter("products")
        self._pairs = runner.counter("pairs")
        self._largest = runner.distribution("partition_members")

    def process(self, element):
        partition, slices = element
        table = pa.Table.from_batches([bk.read_partition_slice(path, k) for path, k in sorted(slices)])
        rows = table.column("row").to_numpy()
        ids = table.column("item_id").combine_chunks()
        emb_col = table.column("embedding").combine_chunks()
        emb = emb_col.values.to_numpy(zero_copy_only=False).reshape(len(rows), -1)
        assign_col = table.column("assign").combine_chunks()
        assign = assign_col.values.to_numpy(zero_copy_only=False).reshape(len(rows), -1)
        self._largest.update(len(rows))
        gi, gj, cos, products = candidates.partition_pairs(partition, rows, emb, assign, self._cos,
                                                           threads=self._threads)
        self._products.inc(products)
        if len(gi):
            order = np.argsort(rows)
            position = order[np.searchsorted(rows, gi, sorter=order)]
            position_j = order[np.searchsorted(rows, gj, sorter=order)]
            self._pairs.inc(len(gi))
            yield matches_table(_take(ids, position), _take(ids, position_j), cos, self._model_id, self._run_id)


class SampleExactFn(_BlockDoFn):
    """block -> exact pairs (sample item id, other item id, cos) of the recall sample against it."""

    def __init__(self, manifest, cos_threshold, model_id, run_id, threads, sample_rows, sample_emb):
        super().__init__(manifest, cos_threshold, model_id, run_id, threads)
        self._sample_rows = sample_rows
        self._sample_emb = sample_emb

    def process(self, block):
        ids, emb = self._cache.get(block)
        i, j, cos = matching.pairs_above_threshold(self._sample_emb, emb, self._cos, same_block=False,
                                                   threads=self._threads, check=False)
        glob_j = j + block * self._cache.manifest.block_size
        keep = self._sample_rows[i] != glob_j
        i, j, cos = i[keep], j[keep], cos[keep]
        if len(i):
            yield pa.table({"sample_row": pa.array(self._sample_rows[i], pa.int64()),
                            "other_row": pa.array(glob_j[keep], pa.int64()),
                            "cosine": pa.array(cos, pa.float32())}, schema=SAMPLE_PAIRS_SCHEMA)


# ------------------------------------------------------------------------------------------- driver

def _check_against_card(card, model_id: str, dim: int, n: int) -> str:
    if card is None:
        return model_id
    if n and card["model_id"] != model_id:
        raise ValueError(
            f"templates were embedded by model {model_id} but --model_dir holds model {card['model_id']}; "
            "its thresholds do not apply"
        )
    if n and card["embedding_dim"] != dim:
        raise ValueError(f"templates have dimension {dim}, the model card says {card['embedding_dim']}")
    return model_id or card["model_id"]


def read_pairs(path: str) -> tuple[list[str], list[str]]:
    """The pairs to verify: a CSV file (header with left_id,right_id) or a Parquet glob with those columns."""
    if path.endswith(".csv"):
        import csv
        import io as _io

        from apache_beam.io.filesystem import CompressionTypes

        with bio.FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            reader = csv.DictReader(_io.StringIO(f.read().decode("utf-8")))
            if not reader.fieldnames or not {"left_id", "right_id"} <= set(reader.fieldnames):
                raise ValueError(f"pairs CSV {path} needs columns left_id,right_id; it has {reader.fieldnames}")
            rows = [((r["left_id"] or "").strip(), (r["right_id"] or "").strip()) for r in reader]
        left, right = [r[0] for r in rows], [r[1] for r in rows]
    else:
        left, right = [], []
        for _, batch in bk.iter_parquet_batches(path, ["left_id", "right_id"], "pairs"):
            left += batch.column("left_id").to_pylist()
            right += batch.column("right_id").to_pylist()
    for a, b in zip(left, right):
        if not a or not b:
            raise ValueError(f"pairs {path}: empty item id")
        if a == b:
            raise ValueError(f"pairs {path}: pair of {a!r} with itself")
    return left, right


def _pair_tasks(manifest: bk.Manifest, left: list[str], right: list[str]) -> list:
    ids = bk.all_item_ids(manifest)
    la, ra = pa.array(left, pa.string()), pa.array(right, pa.string())
    ia = pc.index_in(la, value_set=ids).to_numpy(zero_copy_only=False)
    ib = pc.index_in(ra, value_set=ids).to_numpy(zero_copy_only=False)
    for side, idx, names in (("left", ia, left), ("right", ib, right)):
        missing = np.flatnonzero(np.isnan(idx)) if idx.dtype.kind == "f" else np.zeros(0, np.int64)
        if missing.size:
            raise ValueError(f"{missing.size} pairs name {side} items that are not among the templates, e.g. "
                             f"{names[int(missing[0])]!r}")
    ia, ib = ia.astype(np.int64), ib.astype(np.int64)
    ba, wa = bk.block_of_rows(manifest, ia)
    bb, wb = bk.block_of_rows(manifest, ib)
    tasks = {}
    for k in range(len(ia)):
        tasks.setdefault((int(ba[k]), int(bb[k])), ([], []))
        tasks[(int(ba[k]), int(bb[k]))][0].append(int(wa[k]))
        tasks[(int(ba[k]), int(bb[k]))][1].append(int(wb[k]))
    return [(key, (np.asarray(a, np.int64), np.asarray(b, np.int64))) for key, (a, b) in sorted(tasks.items())]


def _recall(manifest, sample_glob: str, matches_glob: str, sample_ids: list[str]) -> dict:
    """Recall of the written matches against the exact pairs of the sample items (global row pairs)."""
    exact = set()
    for _, batch in bk.iter_parquet_batches(sample_glob, ["sample_row", "other_row"], "recall sample"):
        for a, b in zip(batch.column("sample_row").to_pylist(), batch.column("other_row").to_pylist()):
            exact.add((a, b) if a < b else (b, a))
    all_ids = bk.all_item_ids(manifest)
    sample_set = pa.array(sorted(set(sample_ids)), pa.string())
    found_rows = set()
    for _, batch in bk.iter_parquet_batches(matches_glob, ["left_id", "right_id"], "matches"):
        left, right = batch.column("left_id"), batch.column("right_id")
        hit = pc.or_(pc.is_in(left, value_set=sample_set), pc.is_in(right, value_set=sample_set))
        if not pc.any(hit).as_py():
            continue
        l_rows = pc.index_in(left.filter(hit), value_set=all_ids).to_numpy(zero_copy_only=False)
        r_rows = pc.index_in(right.filter(hit), value_set=all_ids).to_numpy(zero_copy_only=False)
        for a, b in zip(l_rows.astype(np.int64).tolist(), r_rows.astype(np.int64).tolist()):
            found_rows.add((a, b) if a < b else (b, a))
    found = len(exact & found_rows)
    return {**candidates.recall_estimate(found, len(exact)), "sample_items": len(set(sample_ids)),
            "definition": "exact pairs (cosine >= threshold) of a random sample of items against the whole "
                          "catalogue; recall = those the approximate search wrote to the matches"}


def _check_knn_applies(opts, n_items: int, why: str = "--score_norm knn") -> None:
    if opts.mode != "all_pairs" or opts.search != "exact":
        raise ValueError(f"{why} is for --mode all_pairs --search exact (each item's k-th neighbour comes from the "
                         "whole catalogue)")
    if n_items > knn_norm.MAX_ITEMS:
        raise ValueError(f"{why}: kNN normalisation computes each item's k-th neighbour in the driver, for at most "
                         f"{knn_norm.MAX_ITEMS:,} items; the catalogue has {n_items:,}")


def score_norm(opts, card: dict | None, method: str, n_items: int, review_doc: dict | None = None
               ) -> tuple[str, str | None]:
    """(what the threshold cuts: "none" or "knn", a note when the card's choice was not followed).

    --review_threshold: the reviewed run's score (a contradicting --score_norm is refused). --score_norm
    given: that, refused where it cannot apply. Not given: the card's training.score_norm (the general
    copy-detection recipe asks for knn) for a self-calibrated all-pairs exact run of at most
    knn_norm.MAX_ITEMS items; otherwise none, and the note says why."""
    if method == "review":
        wanted = "knn" if review_doc["score"] == "knn_normalised" else "none"
        if opts.score_norm not in (None, wanted):
            raise ValueError(f"--review_threshold cuts {review_doc['score'].replace('_', ' ')} scores; "
                             f"--score_norm {opts.score_norm} contradicts it")
        if wanted == "knn":
            _check_knn_applies(opts, n_items, "--review_threshold of kNN-normalised scores")
        return wanted, None
    if opts.score_norm == "knn":
        if method == "model_card":
            raise ValueError("--target_fmr takes the card's angular thresholds, which kNN-normalised scores do "
                             "not share; let match self-calibrate, give --threshold, or pass --score_norm none")
        _check_knn_applies(opts, n_items)
        return "knn", None
    if opts.score_norm == "none":
        return "none", None
    asked = ((card or {}).get("training") or {}).get("score_norm", "none")
    if asked != "knn":
        return "none", None
    reason = None
    if opts.mode != "all_pairs" or opts.search != "exact":
        reason = f"--mode {opts.mode} --search {opts.search}"
    elif method != "self_calibrated":
        reason = "a given or card threshold is an angular similarity"
    elif n_items > knn_norm.MAX_ITEMS:
        reason = f"{n_items:,} items (more than {knn_norm.MAX_ITEMS:,})"
    elif n_items <= opts.knn_k:
        reason = f"{n_items} items, no {opts.knn_k}th neighbour"
    if reason is None:
        return "knn", None
    return "none", (f"the model card asks for kNN-normalised scores, but this run cuts the angular similarity: "
                    f"{reason}; pass --score_norm knn to insist where it applies")


def check_options(opts: MatchOptions) -> None:
    """Refuse flags that do not go together (ValueError), before anything is read."""
    if opts.search == "approximate" and opts.mode != "all_pairs":
        raise ValueError("--search approximate is for --mode all_pairs; queries and pairs are matched exactly")
    if opts.mode == "queries" and not opts.queries:
        raise ValueError("--mode queries needs --queries (a glob of query templates)")
    if opts.mode == "pairs" and not opts.pairs:
        raise ValueError("--mode pairs needs --pairs (CSV or Parquet with left_id,right_id)")


def check_threshold_flags(opts: MatchOptions, card: dict | None) -> tuple[str, dict | None]:
    """(how the threshold is chosen: thresholds.threshold_method, the review_threshold.json document or None),
    refusing a bad given threshold, or self-calibration without a model, before anything is read."""
    from beam_pipeline import review  # imported when used (matplotlib): options.py imports this module

    method = threshold_method(opts.threshold, opts.target_fmr, opts.target_precision, opts.max_false_pairs,
                              opts.review_threshold)
    review_doc = None
    if method == "review":  # read (and checked against the templates' model later) before any work
        review_doc = review.load_review_threshold(opts.review_threshold)
    elif method != "self_calibrated":  # a bad given threshold is refused before reading anything
        resolve_threshold(opts.threshold, card, opts.target_fmr, opts.threshold_protocol)
    elif not opts.model_dir:
        raise ValueError("choosing the threshold for this catalogue (self-calibration) needs --model_dir (the "
                         "encoder makes the synthetic copies); or pass --threshold")
    return method, review_doc


def choose_threshold(opts: MatchOptions, card: dict | None, method: str, review_doc: dict | None,
                     manifest: bk.Manifest, model_id: str) -> tuple[dict, knn_norm.KnnScores | None]:
    """The run's threshold (match_run.json's "threshold": value, score, cosine, source, score_norm, ...) for
    the staged catalogue `manifest` of model `model_id`, and the kNN scores when it cuts kNN-normalised
    scores (else None)."""
    # Imported when used (scipy, matplotlib): options.py imports this module for MODES and SEARCHES.
    from beam_pipeline import review, self_calibration

    if review_doc is not None:  # read before the templates (check_threshold_flags); now their model is known
        review.check_review_model(review_doc, opts.review_threshold, model_id)
    norm, norm_note = score_norm(opts, card, method, manifest.n, review_doc)
    knn = None
    if norm == "knn":
        t_knn = time.perf_counter()
        k, beta = (opts.knn_k, opts.knn_beta) if review_doc is None else \
            (int(review_doc["knn"]["k"]), float(review_doc["knn"]["beta"]))
        knn = knn_norm.KnnScores(k, beta, knn_norm.catalogue_b(manifest, k), manifest)
        LOG.info("kNN score normalisation: b of %d items (k=%d) in %.1fs", manifest.n, opts.knn_k,
                 time.perf_counter() - t_knn)
    if method == "self_calibrated":
        threshold = self_calibration.calibrate_catalogue(
            manifest, opts.templates, opts.model_dir,
            target_precision=None if opts.max_false_pairs is not None
            else (opts.target_precision or self_calibration.DEFAULT_TARGET_PRECISION),
            max_false_pairs=opts.max_false_pairs, copies=opts.calibration_copies, seed=opts.seed,
            log=LOG.info, knn=knn)
    elif method == "review":
        cut = knn_cut(review_doc["value"], knn.k, knn.beta) if knn else angular_cut(review_doc["value"])
        threshold = {**cut, "source": "review", "target_fmr": None, "impostor_pairs": None,
                     "review": {k: review_doc.get(k) for k in review.STATED}}
    elif knn is not None:
        threshold = {**knn_cut(opts.threshold, knn.k, knn.beta), "source": "given", "target_fmr": None,
                     "impostor_pairs": None}
    else:
        threshold = resolve_threshold(opts.threshold, card, opts.target_fmr, opts.threshold_protocol)
    threshold["score_norm"] = {"method": norm, "note": norm_note, **(knn.to_json() if knn else {})}
    return threshold, knn


# ------------------------------------------------------------------------------------------- builders

@dataclasses.dataclass
class Job:
    """What every mode's builder takes: the flags, the staged catalogue and the run's threshold.

    stage_root: where staged inputs go; output_dir: the run's staging directory (its tables are published
    from there); lineage: what every written shard records (a builder may add to it); staged: directories
    to delete after the run (a builder appends those it stages)."""

    opts: MatchOptions
    manifest: bk.Manifest
    model_id: str
    run_id: str
    threads: int
    threshold: dict
    knn: knn_norm.KnnScores | None
    stage_root: str
    output_dir: str
    lineage: dict
    staged: list

    @property
    def cos(self) -> float | None:
        """The threshold's cosine, what the kernels compare with (None when it cuts kNN-normalised scores)."""
        return self.threshold["cosine"]


class Built(NamedTuple):
    """What a builder added: the matches Tables, the mode's keys of match_run.json, and what it reads back
    once the pipeline has run (`after(result, matches_glob)` -> (more keys, recall or None); None: nothing)."""

    matches: beam.PCollection
    extra: dict
    after: Callable | None = None


def build_exact(p: beam.Pipeline, job: Job) -> Built:
    """all_pairs, exact: strips of block pairs (i, j >= i), each a tiled matrix product."""
    nb = job.manifest.num_blocks
    strip = strip_width(nb)
    tasks = exact_strips(nb, strip)
    knn = None if job.knn is None else (job.knn.b, job.knn.beta, job.threshold["value"])
    matches = (p | "Tasks" >> beam.Create(tasks) | "Spread" >> beam.Reshuffle()
               | "MatchStrips" >> beam.ParDo(ExactStripFn(job.manifest.to_json(), job.cos, job.model_id,
                                                          job.run_id, job.threads, knn)))
    return Built(matches, {"block_pairs": nb * (nb + 1) // 2, "tasks": len(tasks), "blocks_per_strip": strip})


def build_approximate(p: beam.Pipeline, job: Job) -> Built:
    """all_pairs, approximate: k-means partitions with multi-assignment, and the exact pairs of a sample of
    items, from which `after` measures the recall."""
    opts, manifest = job.opts, job.manifest
    rng = np.random.default_rng(opts.seed)
    k = opts.partitions or candidates.default_partitions(manifest.n)
    k = max(1, min(k, manifest.n))
    fit_rows = np.sort(rng.choice(manifest.n, min(manifest.n, opts.kmeans_sample), replace=False)) \
        if manifest.n else np.zeros(0, np.int64)
    _, fit_emb = bk.read_rows(manifest, fit_rows)
    centroids = candidates.spherical_kmeans(fit_emb, k, iters=opts.kmeans_iters, seed=opts.seed) \
        if manifest.n else np.zeros((1, max(1, manifest.dim)), np.float32)
    sample_rows = np.sort(rng.choice(manifest.n, min(manifest.n, opts.recall_sample), replace=False)) \
        if manifest.n else np.zeros(0, np.int64)
    sample_ids, sample_emb = bk.read_rows(manifest, sample_rows)
    extra = {"partitions": int(len(centroids)), "max_assign": opts.max_assign,
             "kmeans_sample": int(len(fit_rows)), "recall_sample": int(len(sample_rows))}
    doc = manifest.to_json()
    block_ids = list(range(manifest.num_blocks))
    slices_dir = bio.FileSystems.join(job.stage_root, "slices")
    job.staged.append(slices_dir)
    matches = (
        p | "Blocks" >> beam.Create(block_ids) | "SpreadBlocks" >> beam.Reshuffle()
        | "Assign" >> beam.ParDo(AssignBlockFn(doc, job.cos, job.model_id, job.run_id, job.threads, centroids,
                                               opts.max_assign, slices_dir))
        | "ByPartition" >> beam.GroupByKey()
        | "MatchPartitions" >> beam.ParDo(PartitionMatchFn(job.cos, job.model_id, job.run_id, job.threads))
    )
    _ = (
        p | "SampleBlocks" >> beam.Create(block_ids) | "SpreadSample" >> beam.Reshuffle()
        | "SampleExact" >> beam.ParDo(SampleExactFn(doc, job.cos, job.model_id, job.run_id, job.threads,
                                                    sample_rows, sample_emb))
        | "WriteSample" >> bio.WriteTable(job.stage_root, "recall_sample", SAMPLE_PAIRS_SCHEMA, num_shards=1)
    )
    job.staged.append(bio.FileSystems.join(job.stage_root, "recall_sample"))

    def after(result, matches_glob: str) -> tuple[dict, dict]:
        counts = runner.counters(result)
        more = {"capped_items": counts.get("capped_items"), "assignments": counts.get("assignments"),
                "partition_members": runner.distribution_of(result, "partition_members")}
        return more, _recall(manifest, bio.table_glob(job.stage_root, "recall_sample"), matches_glob, sample_ids)

    return Built(matches, extra, after)


# --search of --mode all_pairs: its valid values are this table's keys (options.py reads SEARCHES).
ALL_PAIRS_SEARCHES = {"exact": build_exact, "approximate": build_approximate}
SEARCHES = tuple(ALL_PAIRS_SEARCHES)


def build_all_pairs(p: beam.Pipeline, job: Job) -> Built:
    """all_pairs: every pair within the catalogue, by the --search of ALL_PAIRS_SEARCHES."""
    return ALL_PAIRS_SEARCHES[job.opts.search](p, job)


def build_queries(p: beam.Pipeline, job: Job) -> Built:
    """queries (1:N): stage the query templates; every query block against every catalogue block, the
    --top_k best pairs per query at or above the threshold."""
    opts, manifest = job.opts, job.manifest
    query_dir = bio.FileSystems.join(job.stage_root, "queries")
    query_manifest = bk.stage_templates(opts.queries, query_dir, opts.block_size, what="query templates")
    job.staged.append(query_dir)
    if query_manifest.n and manifest.n and (query_manifest.model_id, query_manifest.dim) != (
            manifest.model_id, manifest.dim):
        raise ValueError(
            f"queries are of model {query_manifest.model_id} (dimension {query_manifest.dim}), the "
            f"catalogue of model {manifest.model_id} (dimension {manifest.dim}): not comparable")
    job.lineage["queries"] = outputs.templates_fingerprint(opts.queries)
    nb, qdoc = manifest.num_blocks, query_manifest.to_json()
    strip = max(1, min(16, nb // max(1, 64 // max(1, query_manifest.num_blocks))))
    tasks = [(qb, c0, min(nb, c0 + strip)) for qb in range(query_manifest.num_blocks)
             for c0 in range(0, nb, strip)]
    model_id, run_id = job.model_id, job.run_id
    matches = (
        p | "Tasks" >> beam.Create(tasks) | "Spread" >> beam.Reshuffle()
        | "MatchQueries" >> beam.ParDo(QueryStripFn(manifest.to_json(), qdoc, job.cos, model_id, run_id,
                                                    job.threads, opts.top_k))
        | "ByQueryBlock" >> beam.GroupByKey()
        | "TopK" >> beam.ParDo(MergeQueryBlockFn(qdoc, model_id, run_id, opts.top_k))
        # A pair of two items that are both queries and catalogue items is found from both sides.
        | "Gather" >> beam.combiners.ToList()
        | "Dedupe" >> beam.FlatMap(_dedupe_tables, model_id=model_id, run_id=run_id)
    )
    return Built(matches, {"queries": query_manifest.n, "top_k": opts.top_k, "tasks": len(tasks)})


def build_pairs(p: beam.Pipeline, job: Job) -> Built:
    """pairs (1:1): the --pairs, grouped by the blocks of their two items; every pair's similarity to
    verifications/, those at or above the threshold to the matches."""
    left, right = read_pairs(job.opts.pairs)
    pair_tasks = _pair_tasks(job.manifest, left, right)
    model_id, run_id = job.model_id, job.run_id
    verified = (p | "PairTasks" >> beam.Create(pair_tasks) | "Spread" >> beam.Reshuffle()
                | "Verify" >> beam.ParDo(VerifyPairsFn(job.manifest.to_json(), job.cos, model_id, run_id,
                                                       job.threads)))
    _ = verified | "WriteVerifications" >> bio.WriteTable(
        job.output_dir, "verifications", outputs.with_lineage(VERIFICATIONS_SCHEMA, job.lineage),
        num_shards=job.opts.num_shards)
    matches = (verified | "KeepMatches" >> beam.Map(_verified_matches)
               | "Dedupe" >> beam.combiners.ToList()
               | "DedupeTables" >> beam.FlatMap(_dedupe_tables, model_id=model_id, run_id=run_id))
    return Built(matches, {"given_pairs": int(sum(len(t[1][0]) for t in pair_tasks)), "tasks": len(pair_tasks)})


# --mode: its valid values are this table's keys (options.py reads MODES).
BUILDERS = {"all_pairs": build_all_pairs, "queries": build_queries, "pairs": build_pairs}
MODES = tuple(BUILDERS)


def run(argv=None, test_pipeline=None) -> dict:
    """Run the match pipeline; returns {"matches", "pairs", "items", "threshold", "seconds", "run_id",
    "model_id", ...}.

    Parses the flags, stages the catalogue in blocks, chooses the threshold, adds the transforms of the
    mode's builder (BUILDERS) and runs them; the matches, and match_run.json (schemas.documents.
    MATCH_RUN_SCHEMA), are published into --output when the run has finished. match_run.json's
    stage_seconds is the time before the pipeline runs (staging, the threshold, the builder)."""
    started = time.perf_counter()
    pipeline_options, opts = parse_stage_options(
        argv, MatchOptions, "Match templates at or above the threshold: all pairs, queries (1:N) or given pairs "
        "(1:1), exact or approximate, in bounded memory."
    )
    check_options(opts)
    run_id = opts.run_id or new_run_id()
    threads = opts.kernel_threads or matching.default_threads()
    card = load_model_card(opts.model_dir) if opts.model_dir else None
    method, review_doc = check_threshold_flags(opts, card)

    staged_run = outputs.StagedRun(opts.output, "match", run_id)
    # The blocks live in the run's staging area (removed with it), or under --staging_dir.
    stage_root = opts.staging_dir or staged_run.dir
    stage_dir = bio.FileSystems.join(stage_root, "catalogue")
    t0 = time.perf_counter()
    staged = []  # block directories
    with staged_run, contextlib.ExitStack() as cleanup:
        if not opts.keep_staging:
            cleanup.callback(lambda: [bk.delete_staging(d) for d in staged])
        manifest = bk.stage_templates(opts.templates, stage_dir, opts.block_size)
        staged.append(stage_dir)
        templates_lineage = outputs.templates_fingerprint(opts.templates)
        model_id = _check_against_card(card, manifest.model_id, manifest.dim, manifest.n)
        threshold, knn = choose_threshold(opts, card, method, review_doc, manifest, model_id)
        lineage = {"stage": "match", "run_id": run_id, "model_id": model_id, "templates": templates_lineage,
                   "threshold": threshold["value"], "score": threshold["score"],
                   "threshold_source": threshold["source"],
                   "mode": opts.mode, "search": opts.search}
        job = Job(opts, manifest, model_id, run_id, threads, threshold, knn, stage_root, staged_run.dir, lineage,
                  staged)
        p = runner.new_pipeline(pipeline_options, test_pipeline)
        built = BUILDERS[opts.mode](p, job)
        _ = built.matches | "WriteMatches" >> bio.WriteTable(
            staged_run.dir, "matches", outputs.with_lineage(MATCHES_SCHEMA, lineage), num_shards=opts.num_shards)
        t1 = time.perf_counter()
        result = runner.run(p, pipeline_options)
        pipeline_seconds = time.perf_counter() - t1
        staged_glob = bio.table_glob(staged_run.dir, "matches")
        pairs = bio.count_parquet_rows(staged_glob)
        extra = {**built.extra, "products": runner.counters(result).get("products")}
        recall = None
        if built.after is not None:
            more, recall = built.after(result, staged_glob)
            extra.update(more)
        seconds = round(time.perf_counter() - started, 3)
        matches_glob = bio.table_glob(opts.output, "matches")
        run_doc = {
            "run_id": run_id,
            "model_id": model_id,
            "threshold": threshold,
            "mode": opts.mode,
            "search": opts.search,
            "items": manifest.n,
            "pairs": pairs,
            "recall": recall,
            "block_size": opts.block_size,
            "kernel_threads": threads,
            **extra,
            "templates": opts.templates,
            "templates_lineage": templates_lineage,
            "matches": matches_glob,
            "stage_seconds": round(t1 - t0, 3),
            "pipeline_seconds": round(pipeline_seconds, 3),
            "seconds": seconds,
        }
        if opts.mode == "pairs":
            run_doc["verifications"] = bio.table_glob(opts.output, "verifications")
        run_path = staged_run.path("match_run.json")
        bio.write_json(run_path, validate_match_run(run_doc, run_path))
        staged_run.publish()
    LOG.info("match: %d items, %d pairs at %s >= %.4f (%s, %s %s)", manifest.n, pairs, threshold["score"],
             threshold["value"], threshold["source"], opts.mode, opts.search)
    return {"matches": matches_glob, "pairs": pairs, "items": manifest.n, "threshold": threshold,
            "seconds": seconds, "run_id": run_id, "model_id": model_id, "mode": opts.mode, "search": opts.search,
            "recall": recall, "moved_aside": staged_run.moved_aside}


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run()
