"""The dedup pipeline: templates + matches in, one clusters row per template item out.

    siamese-dedup dedup --templates 'D/templates/*.parquet' --matches 'D/matches/*.parquet' --output D
        [--keeper_policy first_id|largest_image|oldest|column] [--linkage complete|single]

1. The driver reads only the id, content and model columns of both tables (no embeddings) and refuses,
   before any work, matches that were not made from these templates (their lineage records the
   templates' fingerprint: beam_pipeline.outputs), matches of several match runs, of another model or
   naming items that are not among the templates. It takes the threshold from --threshold (not below
   the matches' own) or the matches' lineage.
2. The pipeline reads the item columns it needs (item_id, width, height, embedded_at) and the matched
   pairs, and runs clustering.cluster_items on one worker: clustering is global, but the edges are only
   the pairs above the threshold (a small multiple of the duplicates, not N^2), so they fit one worker for
   catalogues of tens of millions. --linkage complete (default): complete linkage on the matched pairs
   alone (every two members of a cluster are a matched pair; O(E log E) in the pairs E of a component,
   no embeddings read). --linkage single: connected components; the embeddings of the matched items only
   are read too (a filter on the set of items the matches name) to measure each cluster's smallest
   member-to-member similarity and flag clusters held together only by a chain (is_chained).
   Every cluster records its weakest link and its smallest member-to-member similarity.
3. Rows (every item: cluster_id = keeper's item_id, is_keeper, cluster_size, min_link_similarity,
   min_member_similarity, is_chained) are written to D/clusters/clusters-*.parquet, with their lineage
   (templates fingerprint, match run), staged and published when the run has finished.
"""
from __future__ import annotations

import logging
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beam_pipeline import blocks as bk
from beam_pipeline import clustering
from beam_pipeline import io as bio
from beam_pipeline import outputs, runner
from beam_pipeline.options import DedupOptions, new_run_id, parse_stage_options
from schemas.tables import CLUSTERS_SCHEMA

LOG = logging.getLogger(__name__)
ITEM_COLUMNS = ["item_id", "width", "height", "embedded_at", "model_id"]
# An edge's weight is the matches' score: what match's threshold cut (the angular similarity, or the
# kNN-normalised score), so the clusters' threshold and links are in the threshold's own units.
EDGE_COLUMNS = ["left_id", "right_id", "score", "model_id"]
ROWS_PER_TABLE = 100_000


def _column_values(glob: str, columns: list[str], what: str) -> pa.Table:
    tables = [pa.Table.from_batches([b]) for _, b in bk.iter_parquet_batches(glob, columns, what)]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def check_inputs(templates: pa.Table, matches: pa.Table) -> str:
    """Refuse matches that do not belong to `templates` (ValueError); returns the model_id.

    Both tables need only their id and model_id columns.
    """
    models = set(pc.unique(templates.column("model_id")).to_pylist())
    if len(models) > 1:
        raise ValueError(f"templates come from {len(models)} different models {sorted(models)[:5]}")
    ids = templates.column("item_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        raise ValueError("templates hold duplicate item ids")
    match_models = set(pc.unique(matches.column("model_id")).to_pylist()) if matches.num_rows else set()
    if match_models - models and templates.num_rows:
        raise ValueError(f"matches come from model(s) {sorted(match_models - models)}, templates from {sorted(models)}")
    known = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    for column in ("left_id", "right_id"):
        values = matches.column(column)
        unknown = values.filter(pc.invert(pc.is_in(values, value_set=known))) if matches.num_rows else []
        if len(unknown):
            first = sorted(set(unknown.to_pylist()))
            raise ValueError(
                f"{len(first)} matched items are not among the templates, e.g. {first[0]!r}: "
                "were the matches computed from these templates?"
            )
    return next(iter(models)) if models else ""


def match_threshold(matches_lineage: dict, given: float | None) -> float | None:
    """The angular threshold for the clusters: `given` (at or above the one the matches were made at: the
    matches hold no pair below theirs), else the matches' own (their lineage), else None (the weakest
    pair is used)."""
    made_at = matches_lineage.get("threshold")
    if given is not None:
        if made_at is not None and given < made_at - 1e-9:
            raise ValueError(f"--threshold {given} is below the {made_at:.6f} the matches were made at (match "
                             f"run {matches_lineage['run_id']}): pairs between the two were never written; rerun "
                             "match at the lower threshold")
        return float(given)
    return None if made_at is None else float(made_at)


def read_keeper_values(path: str, column: str) -> dict:
    """{item_id: value} from a CSV (header with item_id and `column`) or a Parquet glob."""
    if path.endswith(".csv"):
        import csv
        import io as _io

        from apache_beam.io.filesystem import CompressionTypes

        with bio.FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            reader = csv.DictReader(_io.StringIO(f.read().decode("utf-8")))
            if not reader.fieldnames or not {"item_id", column} <= set(reader.fieldnames):
                raise ValueError(f"keeper table {path} needs columns item_id,{column}; it has {reader.fieldnames}")
            out = {}
            for row in reader:
                raw = row[column].strip()
                try:
                    out[row["item_id"]] = float(raw) if raw else None
                except ValueError:
                    out[row["item_id"]] = raw
            return out
    table = _column_values(path, ["item_id", column], "keeper table")
    return dict(zip(table.column("item_id").to_pylist(), table.column(column).to_pylist()))


def member_ids(edges: list[pa.Table]) -> frozenset:
    """Every item named by the matched pairs."""
    ids: set = set()
    for t in edges:
        ids.update(t.column("left_id").to_pylist())
        ids.update(t.column("right_id").to_pylist())
    return frozenset(ids)


def keep_members(batch, members: frozenset):
    """(item_id, embedding) of the template rows whose item is matched at all."""
    ids = batch.column("item_id").to_pylist()
    keep = [k for k, item in enumerate(ids) if item in members]
    if not keep:
        return
    emb = batch.column("embedding")
    if isinstance(emb, pa.ChunkedArray):
        emb = emb.combine_chunks()
    d = emb.type.list_size
    matrix = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    for k in keep:
        yield ids[k], np.array(matrix[k], np.float32)


def cluster_tables(_, items: list[pa.Table], edges: list[pa.Table], embeddings: list, *,
                   config: clustering.ClusterConfig, run_id: str, keeper_values: dict | None = None):
    """Gathered item, edge and member-embedding batches -> CLUSTERS_SCHEMA tables of <= ROWS_PER_TABLE rows,
    clustered as `config` says; `keeper_values` {item_id: value} for keeper_policy column."""
    items = [t for t in items if t.num_rows]
    items_t = pa.concat_tables([t.select(ITEM_COLUMNS) for t in items]) if items else None
    edges = [t for t in edges if t.num_rows]
    edges_t = pa.concat_tables([t.select(EDGE_COLUMNS) for t in edges]) if edges else None
    ids = items_t.column("item_id").to_pylist() if items_t is not None else []
    if edges_t is not None and edges_t.num_rows:
        left = edges_t.column("left_id").to_pylist()
        right = edges_t.column("right_id").to_pylist()
        sim = edges_t.column("score").to_numpy().astype(np.float32)
    else:
        left, right, sim = [], [], np.zeros(0, np.float32)
    column = (lambda name: items_t.column(name).to_numpy(zero_copy_only=False)) if items_t is not None else (
        lambda name: np.zeros(0))
    columns = clustering.KeeperColumns(
        widths=column("width"), heights=column("height"),
        embedded_at=items_t.column("embedded_at").cast(pa.int64()).to_pylist() if items_t is not None else [],
        values=[keeper_values.get(i) for i in ids] if keeper_values is not None else None,
    )
    result = clustering.cluster_items(ids, left, right, sim, config, columns, embeddings=dict(embeddings))
    table = clustering.clusters_table(result, run_id)
    for start in range(0, table.num_rows, ROWS_PER_TABLE):
        yield table.slice(start, ROWS_PER_TABLE)


def cluster_in_process(templates: pa.Table, matches: pa.Table, config: clustering.ClusterConfig, run_id: str,
                       keeper_values: dict | None = None) -> pa.Table:
    """The pipeline's clustering (`cluster_tables`) of a templates and a matches table in memory: one
    CLUSTERS_SCHEMA table, a row per template item, sorted by item_id. `templates` needs ITEM_COLUMNS (and
    the embedding column for single linkage's chain flags); `matches` EDGE_COLUMNS."""
    embeddings = []
    if not clustering.LINKAGE_RULES[config.linkage].members_all_match:
        embeddings = list(keep_members(templates.select(["item_id", "embedding"]), member_ids([matches])))
    tables = list(cluster_tables(None, [templates], [matches], embeddings, config=config, run_id=run_id,
                                 keeper_values=keeper_values))
    return pa.concat_tables(tables) if tables else CLUSTERS_SCHEMA.empty_table()


def recluster(previous: pa.Table, templates: pa.Table, matches: pa.Table, touched: set,
              config: clustering.ClusterConfig, run_id: str, keeper_values: dict | None = None
              ) -> tuple[pa.Table, int]:
    """`cluster_in_process(templates, matches, ...)`, computing only the connected components of the
    matches that hold a `touched` item; every other item keeps its row of `previous` (with this run_id).

    For a catalogue that changed a little: `previous` are the clusters of the same items before, and
    `touched` every item whose pairs may differ from then (added, changed, and the earlier partners of
    removed or changed items). A component without a touched item has the same items and pairs as
    before, so its clusters are the same (clustering is per component; ties break by item id order,
    which a subset keeps). Returns (the clusters, sorted by item_id; how many items were re-clustered).
    Raises ValueError when `previous` lacks one of the untouched items.
    """
    ids = templates.column("item_id").combine_chunks()
    n = len(ids)
    ends = [pc.index_in(matches.column(c), value_set=ids) for c in ("left_id", "right_id")]
    if any(e.null_count for e in ends):
        raise ValueError("the matches name items that are not among the templates")
    i, j = (np.asarray(e.to_numpy(zero_copy_only=False), np.int64) for e in ends)
    labels = clustering.component_labels(n, i, j)
    touched_rows = pc.is_in(ids, value_set=pa.array(sorted(touched), pa.string())).to_numpy(zero_copy_only=False)
    affected = np.isin(labels, labels[touched_rows])
    fresh = cluster_in_process(templates.filter(pa.array(affected)),
                               matches.filter(pa.array(affected[i] if len(i) else np.zeros(0, bool))),
                               config, run_id, keeper_values)
    kept_ids = ids.filter(pa.array(~affected))
    kept = previous.select(CLUSTERS_SCHEMA.names).cast(CLUSTERS_SCHEMA)
    kept = kept.filter(pc.is_in(kept.column("item_id"), value_set=kept_ids))
    if kept.num_rows != len(kept_ids):
        raise ValueError(f"the previous clusters lack {len(kept_ids) - kept.num_rows} of the {len(kept_ids)} "
                         "untouched items: they are not the clusters of these items")
    kept = kept.set_column(CLUSTERS_SCHEMA.get_field_index("run_id"), CLUSTERS_SCHEMA.field("run_id"),
                           pa.array([run_id] * kept.num_rows, pa.string()))
    return pa.concat_tables([kept, fresh]).sort_by("item_id"), fresh.num_rows


def summary_of(clusters: pa.Table) -> dict:
    """clustering.summarize of a clusters table (its cluster_size, is_keeper and is_chained columns)."""
    return clustering.summarize({name: clusters.column(name).to_numpy(zero_copy_only=False)
                                 for name in ("cluster_size", "is_keeper", "is_chained")})


def lineage_of(run_id: str, model_id: str, templates_lineage: dict, matches_lineage: dict, threshold,
               linkage: str, keeper_policy: str) -> dict:
    """What every clusters shard records it was made from (beam_pipeline.outputs)."""
    return {"stage": "dedup", "run_id": run_id, "model_id": model_id, "templates": templates_lineage,
            "matches": {"run_id": matches_lineage["run_id"], "threshold": matches_lineage.get("threshold")},
            "threshold": threshold, "linkage": linkage, "keeper_policy": keeper_policy}


def run(argv=None, test_pipeline=None) -> dict:
    """Run the dedup pipeline; returns {"clusters", "clusters_count", "items_to_drop", "seconds", ...}."""
    started = time.perf_counter()
    pipeline_options, opts = parse_stage_options(
        argv, DedupOptions, "Group matched templates into duplicate clusters and pick a keeper for each."
    )
    run_id = opts.run_id or new_run_id()
    if opts.keeper_policy == "column" and not (opts.keeper_table and opts.keeper_column):
        raise ValueError("--keeper_policy column needs --keeper_table and --keeper_column")
    templates_lineage = outputs.templates_fingerprint(opts.templates)
    matches_lineage = outputs.single_run(opts.matches, "matches", "match")
    outputs.check_matches(matches_lineage, templates_lineage, opts.matches, opts.templates)
    templates = _column_values(opts.templates, ["item_id", "model_id"], "templates")
    matches = _column_values(opts.matches, ["left_id", "right_id", "model_id"], "matches")
    model_id = check_inputs(templates, matches)
    n_items, n_pairs = templates.num_rows, matches.num_rows
    del templates, matches
    if matches_lineage.get("score") == "knn_normalised" and not clustering.LINKAGE_RULES[opts.linkage].members_all_match:
        raise ValueError("these matches cut kNN-normalised scores: single linkage's chain check compares members' "
                         "angular similarities with the threshold, which is a normalised score here; use "
                         "--linkage complete (the default)")
    threshold = match_threshold(matches_lineage, opts.threshold)
    keeper_values = read_keeper_values(opts.keeper_table, opts.keeper_column) if opts.keeper_policy == "column" \
        else None
    lineage = lineage_of(run_id, model_id, templates_lineage, matches_lineage, threshold, opts.linkage,
                         opts.keeper_policy)

    staged = outputs.StagedRun(opts.output, "dedup", run_id)
    with staged:
        _cluster(opts, pipeline_options, test_pipeline, staged.dir, lineage, keeper_values, threshold)
        written = _column_values(bio.table_glob(staged.dir, "clusters"), ["cluster_size", "is_keeper", "is_chained"],
                                 "clusters")
        if written.num_rows != n_items:
            raise RuntimeError(f"{n_items} templates but {written.num_rows} clusters rows were written")
        staged.publish()
    clusters_glob = bio.table_glob(opts.output, "clusters")
    summary = summary_of(written)
    seconds = round(time.perf_counter() - started, 3)
    LOG.info("dedup: %d items, %d pairs -> %d clusters (%d chained), %d items to drop", n_items, n_pairs,
             summary["clusters_count"], summary["chained_clusters"], summary["items_to_drop"])
    return {
        "clusters": clusters_glob,
        "clusters_count": summary["clusters_count"],
        "items_to_drop": summary["items_to_drop"],
        "items": n_items,
        "pairs": n_pairs,
        "largest_cluster": summary["largest_cluster"],
        "chained_clusters": summary["chained_clusters"],
        "keeper_policy": opts.keeper_policy,
        "linkage": opts.linkage,
        "threshold": threshold,
        "model_id": model_id,
        "run_id": run_id,
        "matches_run_id": matches_lineage["run_id"],
        "moved_aside": staged.moved_aside,
        "seconds": seconds,
    }


def _cluster(opts, pipeline_options, test_pipeline, output_dir: str, lineage: dict, keeper_values,
             threshold) -> None:
    """Run the clustering pipeline, writing the clusters table under `output_dir`."""
    p = runner.new_pipeline(pipeline_options, test_pipeline)
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
    if not clustering.LINKAGE_RULES[opts.linkage].members_all_match:  # chain flags measure members by embeddings
        members = edges | "Members" >> beam.Map(member_ids)
        embeddings = (
            p
            | "ReadEmbeddings" >> beam.io.ReadFromParquetBatched(opts.templates, columns=["item_id", "embedding"])
            | "MatchedOnly" >> beam.FlatMap(keep_members, members=beam.pvalue.AsSingleton(members))
            | "GatherEmbeddings" >> beam.combiners.ToList()
        )
    else:  # complete linkage works on the matched pairs alone
        embeddings = p | "NoEmbeddings" >> beam.Create([[]])
    _ = (
        p
        | "Start" >> beam.Create([None])
        | "Cluster" >> beam.FlatMap(
            cluster_tables,
            items=beam.pvalue.AsSingleton(items),
            edges=beam.pvalue.AsSingleton(edges),
            embeddings=beam.pvalue.AsSingleton(embeddings),
            config=clustering.ClusterConfig(
                linkage=opts.linkage, keeper_policy=opts.keeper_policy, keeper_order=opts.keeper_order,
                threshold=threshold, chain_margin=opts.chain_margin,
                max_diameter_members=opts.max_diameter_members,
            ),
            run_id=lineage["run_id"],
            keeper_values=keeper_values,
        )
        | "WriteClusters" >> bio.WriteTable(output_dir, "clusters", outputs.with_lineage(CLUSTERS_SCHEMA, lineage),
                                            num_shards=opts.num_shards)
    )
    runner.run(p, pipeline_options)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run()
