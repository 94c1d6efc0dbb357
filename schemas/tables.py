"""Arrow schemas of the Parquet tables (templates, failures, labels, matches, verifications, clusters,
review pairs, and the match stage's staged recall sample) and their validation.

The column names and types are the contract described in DESIGN.md. `validate_table` checks a table
read back from disk against its schema and its row-level invariants, and raises `SchemaError` naming
the table, the column and what is wrong.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TIMESTAMP = pa.timestamp("us", tz="UTC")
FAILURE_STAGES = ("read", "decode", "inference", "validate")
# How far from 1 an embedding's L2 norm may be (float32 rounding of a normalised vector), for every check
# of unit norm: embed's (a row readers would refuse goes to failures), match's and the tables' readers'.
UNIT_NORM_TOLERANCE = 1e-3


def unit_vector_problems(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of float `embeddings` (n, d) that cannot be templates: (rows with NaN or infinite values,
    rows whose norm is off 1 by more than UNIT_NORM_TOLERANCE, every row's norm (n,)), indices ascending.
    Readers refuse the first of each (the norms of non-finite rows mean nothing)."""
    nonfinite = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(embeddings, axis=1)
    return nonfinite, np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE), norms


class SchemaError(ValueError):
    """A table or document does not follow its contract."""


def templates_schema(dim: int) -> pa.Schema:
    """Schema of the templates table for embeddings of `dim` float32 components."""
    if int(dim) <= 0:
        raise ValueError(f"embedding dimension must be positive, got {dim}")
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("source_uri", pa.string(), nullable=False),
            pa.field("content_sha256", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), int(dim)), nullable=False),
            pa.field("model_id", pa.string(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("embedded_at", TIMESTAMP, nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
        ]
    )


FAILURES_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

# embed --label_key: the label each record carried, beside the templates.
LABELS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

MATCHES_SCHEMA = pa.schema(
    [
        pa.field("left_id", pa.string(), nullable=False),
        pa.field("right_id", pa.string(), nullable=False),
        pa.field("cosine", pa.float32(), nullable=False),
        pa.field("angular_similarity", pa.float32(), nullable=False),
        # What the threshold was applied to: the angular similarity itself, or the kNN-normalised score
        # (siamese_core.similarity.knn_normalised) when match_run.json's threshold says "score": "knn_normalised".
        pa.field("score", pa.float32(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)

# 1:1 verification (match --mode pairs): every given pair with its similarity and the decision.
VERIFICATIONS_SCHEMA = pa.schema(
    [
        pa.field("left_id", pa.string(), nullable=False),
        pa.field("right_id", pa.string(), nullable=False),
        pa.field("cosine", pa.float32(), nullable=False),
        pa.field("angular_similarity", pa.float32(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("is_match", pa.bool_(), nullable=False),
    ]
)

# Exact pairs of match's recall sample (--search approximate; staging only): global rows of the staged
# catalogue, the sample item's first.
SAMPLE_PAIRS_SCHEMA = pa.schema(
    [
        pa.field("sample_row", pa.int64(), nullable=False),
        pa.field("other_row", pa.int64(), nullable=False),
        pa.field("cosine", pa.float32(), nullable=False),
    ]
)

CLUSTERS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("cluster_id", pa.string(), nullable=False),
        pa.field("is_keeper", pa.bool_(), nullable=False),
        pa.field("keeper_id", pa.string(), nullable=False),
        pa.field("cluster_size", pa.int32(), nullable=False),
        # Null for singletons: nothing joined them.
        pa.field("min_link_similarity", pa.float32(), nullable=True),
        pa.field("run_id", pa.string(), nullable=False),
        # Smallest angular similarity between any two members (complete-linkage diameter); null for
        # singletons and for clusters too large to measure (dedup --max_diameter_members).
        pa.field("min_member_similarity", pa.float32(), nullable=True),
        # The cluster holds two members far below the threshold from each other (dedup --chain_margin):
        # it is held together by a chain of links, not by mutual similarity.
        pa.field("is_chained", pa.bool_(), nullable=False),
    ]
)

# Pairs near the threshold for a person to label (siamese-dedup review export / import): the weakest
# matches ("above") and the strongest pairs left out ("below"), left_id < right_id, score in the run's
# score (match_run.json's threshold.score); label: "duplicate", "distinct" or blank (not judged).
REVIEW_PAIRS_SCHEMA = pa.schema(
    [
        pa.field("left_id", pa.string(), nullable=False),
        pa.field("right_id", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("side", pa.string(), nullable=False),
        pa.field("left_uri", pa.string(), nullable=False),
        pa.field("right_uri", pa.string(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=True),
    ]
)

TABLE_NAMES = ("templates", "failures", "matches", "clusters", "verifications", "review_pairs")


def schema_for(name: str, dim: int | None = None) -> pa.Schema:
    """The schema of table `name`; templates need the embedding dimension `dim`."""
    if name == "templates":
        if dim is None:
            raise ValueError("the templates schema needs the embedding dimension")
        return templates_schema(dim)
    schemas = {"failures": FAILURES_SCHEMA, "matches": MATCHES_SCHEMA, "clusters": CLUSTERS_SCHEMA,
               "verifications": VERIFICATIONS_SCHEMA, "review_pairs": REVIEW_PAIRS_SCHEMA}
    if name not in schemas:
        raise ValueError(f"unknown table {name!r}; expected one of {TABLE_NAMES}")
    return schemas[name]


def _templates_dim(table: pa.Table) -> int:
    if "embedding" not in table.schema.names:
        raise SchemaError("templates: missing column 'embedding'")
    field_type = table.schema.field("embedding").type
    if not pa.types.is_fixed_size_list(field_type):
        raise SchemaError(
            f"templates: column 'embedding' must be fixed_size_list<float32>[dim], got {field_type}"
        )
    return field_type.list_size


def validate_table(table: pa.Table, name: str, dim: int | None = None) -> pa.Table:
    """Check `table` against the contract of table `name` and return it unchanged.

    Checks column names and types (extra columns are refused, order is not significant), nulls in
    non-nullable columns, and row invariants: unique item ids, unit-norm finite embeddings, known failure
    stages, `left_id < right_id` and similarity ranges in matches, one keeper per cluster.
    Raises SchemaError with the table and column named.
    """
    if name == "templates" and dim is None:
        dim = _templates_dim(table)
    expected = schema_for(name, dim)
    missing = [f.name for f in expected if f.name not in table.schema.names]
    extra = [n for n in table.schema.names if n not in expected.names]
    if missing or extra:
        raise SchemaError(f"{name}: missing columns {missing}, unexpected columns {extra}")
    for field in expected:
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise SchemaError(f"{name}: column {field.name!r} must be {field.type}, got {actual}")
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"{name}: column {field.name!r} has {table.column(field.name).null_count} nulls")
    _check_rows(table, name)
    return table.select(expected.names)


def _check_rows(table: pa.Table, name: str) -> None:
    if table.num_rows == 0:
        return
    if name in ("templates", "clusters"):
        ids = table.column("item_id")
        if pc.count_distinct(ids).as_py() != table.num_rows:
            raise SchemaError(f"{name}: column 'item_id' has duplicate values")
    if name == "templates":
        nonfinite, bad, norms = unit_vector_problems(embeddings_as_numpy(table))
        if nonfinite.size:
            raise SchemaError("templates: column 'embedding' has NaN or infinite values")
        if bad.size:
            raise SchemaError(
                f"templates: column 'embedding' must hold unit vectors; row {bad[0]} has norm {norms[bad[0]]:.4f}"
            )
    if name == "failures":
        stages = set(table.column("stage").to_pylist())
        unknown = stages - set(FAILURE_STAGES)
        if unknown:
            raise SchemaError(f"failures: column 'stage' has unknown values {sorted(unknown)}")
    if name in ("matches", "verifications"):
        if not pc.all(pc.less(table.column("left_id"), table.column("right_id"))).as_py():
            raise SchemaError(f"{name}: every row needs left_id < right_id")
        sim = table.column("angular_similarity").to_numpy()
        if (sim < 0).any() or (sim > 1).any():
            raise SchemaError(f"{name}: column 'angular_similarity' must lie in [0, 1]")
    if name == "review_pairs":
        if not pc.all(pc.less(table.column("left_id"), table.column("right_id"))).as_py():
            raise SchemaError("review_pairs: every row needs left_id < right_id")
        sides = set(table.column("side").to_pylist()) - {"above", "below"}
        if sides:
            raise SchemaError(f"review_pairs: column 'side' must be 'above' or 'below'; found {sorted(sides)}")
    if name == "clusters":
        keepers = table.filter(table.column("is_keeper"))
        if pc.count_distinct(keepers.column("cluster_id")).as_py() != keepers.num_rows or (
            keepers.num_rows != pc.count_distinct(table.column("cluster_id")).as_py()
        ):
            raise SchemaError("clusters: every cluster needs exactly one keeper")


def embeddings_as_numpy(table: pa.Table) -> np.ndarray:
    """The `embedding` column of a templates table as a float32 array of shape (rows, dim)."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
