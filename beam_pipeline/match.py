"""The match pipeline: templates in, every pair of items at or above the threshold out (exact, blocked).

    siamese-dedup match --templates 'D/templates/*.parquet' --model_dir MODEL --output D [--threshold 0.9]

1. The driver reads the templates once (beam_pipeline.io) and refuses, before any work, what cannot be
   matched: mixed model_ids or dimensions, NaN or non-unit embeddings, duplicate item ids, or a model
   card of another model. It resolves the threshold (given, or the card's calibration at --target_fmr).
2. The pipeline reads the templates again and gathers them into one index (item ids sorted, their
   embeddings as an (n, d) float32 matrix), a singleton side input broadcast to the workers. The block
   pairs (i <= j, `--block_size` rows per block) are created, reshuffled so the runner spreads them, and
   each is computed by matching.match_block_pair: a chunked matrix product that keeps only pairs with
   cosine >= threshold, so no N x N matrix exists anywhere.
3. Matches (left_id < right_id, cosine, angular_similarity, model_id, run_id) are written to
   D/matches/matches-*.parquet; the driver then writes D/match_run.json.

The side input costs n * d * 4 bytes per worker (1M items x 128 dims = 512 MB); catalogues beyond that
need a candidate stage (DESIGN.md) rather than exact all-pairs.
"""
from __future__ import annotations

import logging
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beam_pipeline import io as bio
from beam_pipeline import matching
from beam_pipeline.options import MatchOptions, new_run_id, parse_stage_options
from beam_pipeline.thresholds import load_card, resolve_threshold
from schemas.tables import MATCHES_SCHEMA, embeddings_as_numpy, validate_table
from trainer.distances import angular_similarity

LOG = logging.getLogger(__name__)
TEMPLATE_COLUMNS = ["item_id", "embedding", "model_id"]


def load_templates(glob: str) -> pa.Table:
    """Read and validate the templates matching `glob`; refuse what cannot be matched (ValueError).

    Returns the table sorted by item_id. Shards of different embedding dimensions, several model_ids,
    duplicate ids and NaN / non-unit embeddings are refused with the reason named.
    """
    try:
        table = bio.read_parquet_table(glob, "templates")
    except OSError as err:
        if "different schemas" not in str(err):
            raise
        dims = {}
        for path in bio.match_paths(glob):
            dims.setdefault(bio.read_parquet_table(path, "templates").schema.field("embedding").type.list_size, path)
        raise ValueError(
            f"templates matching {glob!r} mix embedding dimensions "
            f"{', '.join(f'{d} ({p})' for d, p in sorted(dims.items()))}; match templates of one model"
        ) from err
    except Exception as err:  # SchemaError (a ValueError) names the column and the problem
        if isinstance(err, ValueError):
            raise ValueError(f"templates {glob!r} refused: {err}") from err
        raise
    table = table.take(pc.sort_indices(table, sort_keys=[("item_id", "ascending")]))
    matching.check_catalogue(
        table.column("item_id").to_pylist(), embeddings_as_numpy(table), table.column("model_id").to_pylist()
    )
    return table


def build_index(tables: list[pa.Table], expected_items: int, model_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Gathered templates batches -> (item ids sorted, object array (n,), embeddings float32 (n, d)).

    Checks the pipeline saw the catalogue the driver validated (same size and model), so block indices
    mean the same rows everywhere.
    """
    tables = [t for t in tables if t.num_rows]
    if not tables:
        ids, emb = np.empty(0, object), np.empty((0, 0), np.float32)
    else:
        table = pa.concat_tables(tables)
        table = table.take(pc.sort_indices(table, sort_keys=[("item_id", "ascending")]))
        ids = np.asarray(table.column("item_id").to_pylist(), dtype=object)
        emb = np.ascontiguousarray(embeddings_as_numpy(table))
        models = set(table.column("model_id").to_pylist())
        if models != {model_id}:
            raise ValueError(f"templates changed during the run: model ids {sorted(models)}, expected {model_id}")
    if len(ids) != expected_items:
        raise ValueError(
            f"templates changed during the run: the pipeline read {len(ids)} items, the driver validated "
            f"{expected_items}"
        )
    return ids, emb


def matches_table(
    ids: np.ndarray, i: np.ndarray, j: np.ndarray, cos: np.ndarray, model_id: str, run_id: str
) -> pa.Table:
    """Matches rows (MATCHES_SCHEMA) for index pairs (i, j) into `ids`, left_id < right_id (swapped if
    needed)."""
    a, b = ids[i], ids[j]
    swap = b < a if len(a) else np.zeros(0, np.bool_)
    left, right = np.where(swap, b, a), np.where(swap, a, b)
    # Dot products of unit float32 vectors can overshoot +-1 by an ulp; store the cosine in range.
    cos = np.clip(np.asarray(cos, np.float32), np.float32(-1), np.float32(1))
    k = len(cos)
    return pa.table(
        {
            "left_id": pa.array(left.tolist(), pa.string()),
            "right_id": pa.array(right.tolist(), pa.string()),
            "cosine": pa.array(cos, pa.float32()),
            "angular_similarity": pa.array(angular_similarity(cos).reshape(k), pa.float32()),
            "model_id": pa.array([model_id] * k, pa.string()),
            "run_id": pa.array([run_id] * k, pa.string()),
        },
        schema=MATCHES_SCHEMA,
    )


class MatchBlockPairFn(beam.DoFn):
    """(block_i, block_j) + the index side input -> one Table of the pairs above threshold (if any)."""

    def __init__(self, cos_threshold: float, block_size: int, model_id: str, run_id: str):
        self._cos_threshold = cos_threshold
        self._block_size = block_size
        self._model_id = model_id
        self._run_id = run_id
        self._pairs = beam.metrics.Metrics.counter("match", "pairs")
        self._blocks = beam.metrics.Metrics.counter("match", "block_pairs")

    def process(self, block_pair, index):
        ids, emb = index
        bi, bj = block_pair
        i, j, cos = matching.match_block_pair(emb, bi, bj, self._block_size, self._cos_threshold)
        self._blocks.inc()
        if len(i):
            self._pairs.inc(len(i))
            yield matches_table(ids, i, j, cos, self._model_id, self._run_id)


def run(argv=None, test_pipeline=None) -> dict:
    """Run the match pipeline; returns {"matches", "pairs", "items", "threshold", "seconds", ...}."""
    started = time.perf_counter()
    pipeline_options, opts = parse_stage_options(
        argv, MatchOptions, "Match every pair of templates at or above the threshold (exact, blocked)."
    )
    if opts.block_size <= 0:
        raise ValueError(f"--block_size must be positive, got {opts.block_size}")
    run_id = opts.run_id or new_run_id()

    templates = load_templates(opts.templates)
    n = templates.num_rows
    dim = templates.schema.field("embedding").type.list_size
    model_id = templates.column("model_id")[0].as_py() if n else ""
    card = load_card(opts.model_dir) if opts.model_dir else None
    if card is not None:
        if n and card["model_id"] != model_id:
            raise ValueError(
                f"templates were embedded by model {model_id} but --model_dir holds model {card['model_id']}; "
                "its thresholds do not apply"
            )
        if n and card["embedding_dim"] != dim:
            raise ValueError(f"templates have dimension {dim}, the model card says {card['embedding_dim']}")
        model_id = model_id or card["model_id"]
    threshold = resolve_threshold(opts.threshold, card, opts.target_fmr, opts.threshold_protocol)
    pairs_of_blocks = matching.block_pairs(n, opts.block_size)
    del templates  # the pipeline reads its own copy; the driver only needed to validate

    bio.delete_table_shards(opts.output, "matches")
    p = test_pipeline or beam.Pipeline(options=pipeline_options)
    index = (
        p
        | "ReadTemplates" >> beam.io.ReadFromParquetBatched(opts.templates, columns=TEMPLATE_COLUMNS)
        | "Gather" >> beam.combiners.ToList()
        | "BuildIndex" >> beam.Map(build_index, expected_items=n, model_id=model_id)
    )
    _ = (
        p
        | "BlockPairs" >> beam.Create(pairs_of_blocks)
        | "Spread" >> beam.Reshuffle()
        | "MatchBlocks" >> beam.ParDo(
            MatchBlockPairFn(threshold["cosine"], opts.block_size, model_id, run_id),
            index=beam.pvalue.AsSingleton(index),
        )
        | "WriteMatches" >> bio.WriteTable(opts.output, "matches", MATCHES_SCHEMA, num_shards=opts.num_shards)
    )
    result = p.run()
    result.wait_until_finish()

    matches_glob = bio.table_glob(opts.output, "matches")
    pairs = bio.count_parquet_rows(matches_glob)
    seconds = round(time.perf_counter() - started, 3)
    run_doc = {
        "run_id": run_id,
        "model_id": model_id,
        "threshold": threshold,
        "items": n,
        "pairs": pairs,
        "block_size": opts.block_size,
        "block_pairs": len(pairs_of_blocks),
        "templates": opts.templates,
        "matches": matches_glob,
        "seconds": seconds,
    }
    bio.write_json(bio.FileSystems.join(opts.output, "match_run.json"), run_doc)
    LOG.info("match: %d items, %d pairs at angular similarity >= %.4f (%s)", n, pairs,
             threshold["angular_similarity"], threshold["source"])
    return {"matches": matches_glob, "pairs": pairs, "items": n, "threshold": threshold, "seconds": seconds,
            "run_id": run_id, "model_id": model_id}


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run()
