"""Contracts: Arrow schemas of every table and JSON schemas of the documents (report, model card, match run,
review threshold).

Every writer builds its table with these schemas and every reader validates with them, so a wrong file
fails with an error naming the column and the problem rather than somewhere downstream.
"""
from schemas.tables import (
    CLUSTERS_SCHEMA,
    FAILURES_SCHEMA,
    MATCHES_SCHEMA,
    FAILURE_STAGES,
    SchemaError,
    schema_for,
    templates_schema,
    validate_table,
)
from schemas.documents import validate_match_run, validate_model_card, validate_report

__all__ = [
    "CLUSTERS_SCHEMA",
    "FAILURES_SCHEMA",
    "MATCHES_SCHEMA",
    "FAILURE_STAGES",
    "SchemaError",
    "schema_for",
    "templates_schema",
    "validate_table",
    "validate_match_run",
    "validate_model_card",
    "validate_report",
]
