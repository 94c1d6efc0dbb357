import datetime

import numpy as np
import pyarrow as pa
import pytest

from schemas import (
    CLUSTERS_SCHEMA,
    FAILURES_SCHEMA,
    MATCHES_SCHEMA,
    SchemaError,
    templates_schema,
    validate_table,
)
from schemas.tables import embeddings_as_numpy


def templates_table(embeddings, ids=None, dim=None):
    embeddings = np.asarray(embeddings, np.float32)
    n, d = embeddings.shape
    ids = ids or [f"item_{i}" for i in range(n)]
    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    return pa.table(
        {
            "item_id": ids,
            "source_uri": [f"/cat/{i}.png" for i in ids],
            "content_sha256": ["0" * 64] * n,
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), d),
            "model_id": ["abcdef0123456789"] * n,
            "width": pa.array([28] * n, pa.int32()),
            "height": pa.array([28] * n, pa.int32()),
            "embedded_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            "run_id": ["r1"] * n,
        },
        schema=templates_schema(dim or d),
    )


def test_valid_templates_round_trip_embeddings():
    emb = np.eye(3, dtype=np.float32)
    table = validate_table(templates_table(emb), "templates")
    np.testing.assert_array_equal(embeddings_as_numpy(table), emb)


def test_templates_refuse_non_unit_and_nan_embeddings():
    with pytest.raises(SchemaError, match="unit vectors; row 1 has norm 2.0000"):
        validate_table(templates_table([[1, 0], [2, 0]]), "templates")
    with pytest.raises(SchemaError, match="NaN"):
        validate_table(templates_table([[1, 0], [np.nan, 0]]), "templates")


def test_templates_refuse_duplicate_ids():
    with pytest.raises(SchemaError, match="'item_id' has duplicate values"):
        validate_table(templates_table(np.eye(2), ids=["a", "a"]), "templates")


def test_wrong_column_type_names_the_column():
    table = templates_table(np.eye(2)).set_column(5, "width", pa.array([1, 2], pa.int64()))
    with pytest.raises(SchemaError, match="column 'width' must be int32, got int64"):
        validate_table(table, "templates")


def test_missing_and_extra_columns_are_named():
    table = pa.table({"item_id": ["a"], "surprise": [1]})
    with pytest.raises(SchemaError, match=r"failures: missing columns \['source_uri', 'stage', 'error', 'run_id'\], unexpected columns \['surprise'\]"):
        validate_table(table, "failures")


def test_failures_stage_must_be_known():
    table = pa.table(
        {"item_id": ["a"], "source_uri": ["a"], "stage": ["teleport"], "error": ["x"], "run_id": ["r"]},
        schema=FAILURES_SCHEMA,
    )
    with pytest.raises(SchemaError, match="unknown values \\['teleport'\\]"):
        validate_table(table, "failures")


def test_matches_need_ordered_ids_and_similarity_in_range():
    def matches(left, right, sim):
        return pa.table(
            {"left_id": [left], "right_id": [right], "cosine": pa.array([0.9], pa.float32()),
             "angular_similarity": pa.array([sim], pa.float32()), "score": pa.array([sim], pa.float32()),
             "model_id": ["m"], "run_id": ["r"]},
            schema=MATCHES_SCHEMA,
        )

    validate_table(matches("a", "b", 0.85), "matches")
    with pytest.raises(SchemaError, match="left_id < right_id"):
        validate_table(matches("b", "a", 0.85), "matches")
    with pytest.raises(SchemaError, match=r"\[0, 1\]"):
        validate_table(matches("a", "b", 1.5), "matches")


def test_clusters_need_exactly_one_keeper_each():
    def clusters(keepers):
        return pa.table(
            {"item_id": ["a", "b"], "cluster_id": ["a", "a"], "is_keeper": keepers, "keeper_id": ["a", "a"],
             "cluster_size": pa.array([2, 2], pa.int32()), "min_link_similarity": pa.array([0.9, 0.9], pa.float32()),
             "run_id": ["r", "r"], "min_member_similarity": pa.array([0.9, 0.9], pa.float32()),
             "is_chained": [False, False]},
            schema=CLUSTERS_SCHEMA,
        )

    validate_table(clusters([True, False]), "clusters")
    with pytest.raises(SchemaError, match="exactly one keeper"):
        validate_table(clusters([True, True]), "clusters")
    with pytest.raises(SchemaError, match="exactly one keeper"):
        validate_table(clusters([False, False]), "clusters")


def test_unknown_table_name():
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        validate_table(pa.table({"a": [1]}), "nope")


def test_verifications_need_ordered_ids():
    from schemas.tables import VERIFICATIONS_SCHEMA

    def rows(left, right):
        return pa.table(
            {"left_id": [left], "right_id": [right], "cosine": pa.array([0.2], pa.float32()),
             "angular_similarity": pa.array([0.56], pa.float32()), "model_id": ["m"], "run_id": ["r"],
             "is_match": [False]},
            schema=VERIFICATIONS_SCHEMA,
        )

    assert validate_table(rows("a", "b"), "verifications").num_rows == 1
    with pytest.raises(SchemaError, match="left_id < right_id"):
        validate_table(rows("b", "a"), "verifications")
