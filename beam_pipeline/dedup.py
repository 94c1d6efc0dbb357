"""The dedup pipeline: templates + matches in, one clusters row per template item out.

    siamese-dedup dedup --templates 'D/templates/*.parquet' --matches 'D/matches/*.parquet' --output D

1. The driver validates both tables (beam_pipeline.io) and refuses, before any work, matches of another
   model or naming items that are not among the templates.
2. The pipeline reads the item columns it needs (item_id, width, height) and the matched pairs, gathers
   each into one side input and runs clustering.cluster_items on one worker: connected components are
   global, but the edges are only the pairs above the threshold (a small multiple of the number of
   duplicates, not N^2), so union-find over them fits one worker for catalogues of tens of millions.
3. Rows (every item: cluster_id = keeper's item_id, is_keeper, cluster_size, min_link_similarity, null
   for singletons) are written to D/clusters/clusters-*.parquet.
"""
from __future__ import annotations

import logging
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa

from beam_pipeline import clustering
from beam_pipeline import io as bio
from beam_pipeline.options import DedupOptions, new_run_id, parse_stage_options
from schemas.tables import CLUSTERS_SCHEMA

LOG = logging.getLogger(__name__)
ITEM_COLUMNS = ["item_id", "width", "height", "model_id"]
EDGE_COLUMNS = ["left_id", "right_id", "angular_similarity", "model_id"]
ROWS_PER_TABLE = 100_000


def check_inputs(templates: pa.Table, matches: pa.Table) -> str:
    """Refuse matches that do not belong to `templates` (ValueError); returns the model_id."""
    models = set(templates.column("model_id").to_pylist())
    if len(models) > 1:
        raise ValueError(f"templates come from {len(models)} different models {sorted(models)[:5]}")
    match_models = set(matches.column("model_id").to_pylist())
    if match_models - models and templates.num_rows:
        raise ValueError(f"matches come from model(s) {sorted(match_models - models)}, templates from {sorted(models)}")
    known = set(templates.column("item_id").to_pylist())
    for column in ("left_id", "right_id"):
        unknown = set(matches.column(column).to_pylist()) - known
        if unknown:
            raise ValueError(
                f"{len(unknown)} matched items are not among the templates, e.g. {sorted(unknown)[0]!r}: "
                "were the matches computed from these templates?"
            )
    return next(iter(models)) if models else ""


def cluster_tables(_, items: list[pa.Table], edges: list[pa.Table], keeper_policy: str, run_id: str):
    """Gathered item and edge batches -> CLUSTERS_SCHEMA tables of at most ROWS_PER_TABLE rows."""
    items_t = pa.concat_tables([t.select(ITEM_COLUMNS) for t in items]) if items else None
    edges_t = pa.concat_tables([t.select(EDGE_COLUMNS) for t in edges]) if edges else None
    ids = items_t.column("item_id").to_pylist() if items_t is not None else []
    if edges_t is not None and edges_t.num_rows:
        left = edges_t.column("left_id").to_pylist()
        right = edges_t.column("right_id").to_pylist()
        sim = edges_t.column("angular_similarity").to_numpy().astype(np.float32)
    else:
        left, right, sim = [], [], np.zeros(0, np.float32)
    result = clustering.cluster_items(
        ids, left, right, sim, keeper_policy=keeper_policy,
        widths=items_t.column("width").to_numpy() if items_t is not None else np.zeros(0),
        heights=items_t.column("height").to_numpy() if items_t is not None else np.zeros(0),
    )
    table = clustering.clusters_table(result, run_id)
    for start in range(0, table.num_rows, ROWS_PER_TABLE):
        yield table.slice(start, ROWS_PER_TABLE)


def run(argv=None, test_pipeline=None) -> dict:
    """Run the dedup pipeline; returns {"clusters", "clusters_count", "items_to_drop", "seconds", ...}."""
    started = time.perf_counter()
    pipeline_options, opts = parse_stage_options(
        argv, DedupOptions, "Group matched templates into duplicate clusters and pick a keeper for each."
    )
    run_id = opts.run_id or new_run_id()
    templates = bio.read_parquet_table(opts.templates, "templates")
    matches = bio.read_parquet_table(opts.matches, "matches")
    model_id = check_inputs(templates, matches)
    n_items, n_pairs = templates.num_rows, matches.num_rows
    del templates, matches

    bio.delete_table_shards(opts.output, "clusters")
    p = test_pipeline or beam.Pipeline(options=pipeline_options)
    items = (
        p
        | "ReadItems" >> beam.io.ReadFromParquetBatched(opts.templates, columns=ITEM_COLUMNS)
        | "GatherItems" >> beam.combiners.ToList()
    )
    edges = (
        p
        | "ReadMatches" >> beam.io.ReadFromParquetBatched(opts.matches, columns=EDGE_COLUMNS)
        | "GatherMatches" >> beam.combiners.ToList()
    )
    _ = (
        p
        | "Start" >> beam.Create([None])
        | "Cluster" >> beam.FlatMap(
            cluster_tables,
            items=beam.pvalue.AsSingleton(items),
            edges=beam.pvalue.AsSingleton(edges),
            keeper_policy=opts.keeper_policy,
            run_id=run_id,
        )
        | "WriteClusters" >> bio.WriteTable(opts.output, "clusters", CLUSTERS_SCHEMA, num_shards=opts.num_shards)
    )
    result = p.run()
    result.wait_until_finish()

    clusters_glob = bio.table_glob(opts.output, "clusters")
    written = bio.read_parquet_table(clusters_glob, "clusters")
    if written.num_rows != n_items:
        raise RuntimeError(f"{n_items} templates but {written.num_rows} clusters rows were written")
    summary = clustering.summarize(
        {"cluster_size": written.column("cluster_size").to_numpy(),
         "is_keeper": written.column("is_keeper").to_numpy(zero_copy_only=False)}
    )
    seconds = round(time.perf_counter() - started, 3)
    LOG.info("dedup: %d items, %d pairs -> %d clusters, %d items to drop", n_items, n_pairs,
             summary["clusters_count"], summary["items_to_drop"])
    return {
        "clusters": clusters_glob,
        "clusters_count": summary["clusters_count"],
        "items_to_drop": summary["items_to_drop"],
        "items": n_items,
        "pairs": n_pairs,
        "largest_cluster": summary["largest_cluster"],
        "keeper_policy": opts.keeper_policy,
        "model_id": model_id,
        "run_id": run_id,
        "seconds": seconds,
    }


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run()
