"""JSON schemas of the documents people and programs read: `report.json`, `model_card.json`,
`match_run.json` and `review_threshold.json`."""
from __future__ import annotations

from typing import Any

import jsonschema

from schemas.tables import SchemaError

_NUMBER_OR_NULL = {"type": ["number", "null"]}

THRESHOLD_SCHEMA = {
    "type": "object",
    "required": ["target_fmr", "angular_similarity", "cosine", "impostor_pairs", "fmr", "fmr_upper_95"],
    "properties": {
        "target_fmr": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "angular_similarity": {"type": "number", "minimum": 0, "maximum": 1},
        "cosine": {"type": "number", "minimum": -1, "maximum": 1},
        "impostor_pairs": {"type": "integer", "minimum": 0},
        "fmr": {"type": "number", "minimum": 0, "maximum": 1},
        "fmr_upper_95": {"type": "number", "minimum": 0, "maximum": 1},
        "fnmr": _NUMBER_OR_NULL,
    },
}

# A run's threshold (beam_pipeline.thresholds): the cut on the matches' score column, what that score is,
# and where the threshold came from.
RUN_THRESHOLD_SCHEMA = {
    "type": "object",
    "required": ["value", "score", "angular_similarity", "cosine", "source"],
    "properties": {
        # The cut on the matches' score column; score names what it cuts (beam_pipeline.thresholds).
        "value": {"type": "number"},
        "score": {"enum": ["angular_similarity", "knn_normalised"]},
        # null when the score is kNN-normalised (no angular similarity is cut then)
        "angular_similarity": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "cosine": {"type": ["number", "null"], "minimum": -1, "maximum": 1},
        # "given" or "model_card:<protocol>@fmr=<x>"
        "source": {"type": "string"},
        "target_fmr": _NUMBER_OR_NULL,
        "impostor_pairs": {"type": ["integer", "null"]},
    },
}


def _document(title: str, body: dict) -> dict:
    """The JSON schema (draft 2020-12) of a whole document `title` (a file name): an object with `body`'s
    "required" and "properties"."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, "type": "object", **body}


MODEL_CARD_SCHEMA = _document("model_card.json", {
    "required": ["model_id", "embedding_dim", "input_spec", "training", "data", "metrics", "thresholds"],
    "properties": {
        # sha256 over the weights and the input spec (siamese_core.artefact.model_id_of), first 16 hex digits
        "model_id": {"type": "string", "pattern": "^[0-9a-f]{16,64}$"},
        # sha256 of model.keras, checked before the file is deserialized (card version 2 on)
        "artifact_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "card_version": {"type": "integer", "minimum": 1},
        "embedding_dim": {"type": "integer", "minimum": 1},
        "input_spec": {
            "type": "object",
            "required": ["height", "width", "channels", "dtype", "value_range"],
            "properties": {
                "height": {"type": "integer", "minimum": 1},
                "width": {"type": "integer", "minimum": 1},
                "channels": {"enum": [1, 3]},
                "dtype": {"enum": ["uint8", "float32"]},
                "value_range": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                # siamese_core.decode.border_box: plain bands at the edges are cut before the resize
                "trim_borders": {"type": "boolean"},
            },
        },
        "training": {"type": "object"},
        "data": {"type": "object"},
        "metrics": {"type": "object"},
        # Calibrated thresholds, grouped by protocol (THRESHOLD_PROTOCOLS), each a list of THRESHOLD_SCHEMA.
        "thresholds": {
            "type": "object",
            "additionalProperties": {"type": "array", "items": THRESHOLD_SCHEMA},
        },
    },
})

# The model card's calibration protocols: "instance" (genuine pairs are copies of one image: dedup) and
# "class" (genuine pairs share a class label). match --threshold_protocol picks one.
THRESHOLD_PROTOCOLS = ("instance", "class")

REPORT_SCHEMA = _document("report.json", {
    "required": ["model_id", "run_id", "threshold", "counts", "similarity_histogram", "outputs"],
    "properties": {
        "model_id": {"type": "string"},
        "run_id": {"type": "string"},
        "threshold": RUN_THRESHOLD_SCHEMA,
        "counts": {
            "type": "object",
            "required": ["items", "failures", "pairs", "clusters", "items_to_drop"],
            "properties": {
                k: {"type": "integer", "minimum": 0}
                for k in ("items", "failures", "pairs", "clusters", "items_to_drop")
            },
        },
        "similarity_histogram": {
            "type": "object",
            "required": ["bin_edges", "counts", "of"],
            "properties": {
                "bin_edges": {"type": "array", "items": {"type": "number"}},
                "counts": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                # What was histogrammed, e.g. "matched pairs" or "nearest neighbour per item".
                "of": {"type": "string"},
            },
        },
        "failures_by_stage": {"type": "object", "additionalProperties": {"type": "integer"}},
        # Present when ground truth exists: FMR/FNMR at several thresholds with the counts behind them.
        "evaluation": {"type": ["object", "null"]},
        "outputs": {"type": "object", "additionalProperties": {"type": "string"}},
        # Choosing the threshold (beam_pipeline.report.threshold_choice; absent for queries/pairs runs).
        # all_pairs: every pair's score (or a random subset's: scale estimates the catalogue's counts).
        "all_pairs": {
            "type": "object",
            "required": ["of", "score", "bin_edges", "impostor_counts", "genuine_counts", "items", "items_scored",
                         "exhaustive", "scale"],
            "properties": {
                "bin_edges": {"type": "array", "items": {"type": "number"}},
                "impostor_counts": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "genuine_counts": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}},
                "exhaustive": {"type": "boolean"},
                "scale": {"type": "number", "minimum": 1},
            },
        },
        # What each threshold would give; clusters/items_to_drop are null below the run's threshold.
        "threshold_sweep": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["threshold", "is_run_threshold", "pairs", "expected_false_pairs", "clusters",
                             "items_to_drop"],
                "properties": {
                    "pairs": {"type": "number", "minimum": 0},
                    "expected_false_pairs": _NUMBER_OR_NULL,
                    "clusters": {"type": ["integer", "null"], "minimum": 0},
                    "items_to_drop": {"type": ["integer", "null"], "minimum": 0},
                },
            },
        },
        # With ground truth: ROC/DET/PR points, AUC, EER and the threshold at each target FMR with the
        # impostor pairs behind it and an exact 95% interval of the FMR it reaches.
        "curves": {
            "type": ["object", "null"],
            "required": ["genuine_pairs", "impostor_pairs", "auc", "eer", "at_fmr", "points", "resolution"],
            "properties": {
                "auc": {"type": "number", "minimum": 0, "maximum": 1},
                "at_fmr": {
                    "type": "array",
                    "items": {"type": "object", "required": ["target_fmr", "impostor_pairs", "reached", "threshold"]},
                },
                "points": {
                    "type": "array",
                    "items": {"type": "object", "required": ["threshold", "fmr", "tmr", "precision"]},
                },
            },
        },
        # The weakest matches and the strongest pairs left out, with image URIs (planted: null without truth).
        "near_threshold": {
            "type": "object",
            "required": ["above", "below", "below_of"],
            "properties": {
                side: {"type": "array", "items": {
                    "type": "object",
                    "required": ["left_id", "right_id", "score", "left_uri", "right_uri", "planted"]}}
                for side in ("above", "below")
            },
        },
        # What the report was made from (beam_pipeline.report.check_lineage).
        "lineage": {"type": "object", "required": ["templates", "match_run_id", "dedup_run_id"]},
    },
})


# D/match_run.json: what a match run did (written by match, and by nightly for each generation; read by
# report, review and nightly): the threshold, how the pairs were found and how many.
MATCH_RUN_SCHEMA = _document("match_run.json", {
    "required": ["run_id", "model_id", "threshold", "mode", "search", "items", "pairs"],
    "properties": {
        "run_id": {"type": "string"},
        "model_id": {"type": "string"},
        "threshold": {
            **RUN_THRESHOLD_SCHEMA,
            # kNN-normalised thresholds say how the score was made
            "if": {"properties": {"score": {"const": "knn_normalised"}}},
            "then": {"required": ["knn"]},
        },
        # match --mode / --search (beam_pipeline.match)
        "mode": {"type": "string"},
        "search": {"type": "string"},
        "items": {"type": "integer", "minimum": 0},
        "pairs": {"type": "integer", "minimum": 0},
        # --search approximate: recall against exact search on a sample of items; else null
        "recall": {"type": ["object", "null"]},
        "block_size": {"type": "integer", "minimum": 1},
        "kernel_threads": {"type": "integer", "minimum": 1},
        "templates": {"type": "string"},
        "templates_lineage": {"type": "object", "required": ["fingerprint"]},
        "matches": {"type": "string"},
        "verifications": {"type": "string"},
        "stage_seconds": {"type": "number", "minimum": 0},
        "pipeline_seconds": {"type": "number", "minimum": 0},
        "seconds": {"type": "number", "minimum": 0},
    },
})


# review/review_threshold.json (siamese-dedup review import; read by match --review_threshold): a threshold
# recalibrated on a person's labels of the pairs near the previous one, in that run's score.
REVIEW_THRESHOLD_SCHEMA = _document("review_threshold.json", {
    "required": ["model_id", "value", "score", "labels", "previous", "labelled_pairs", "duplicates", "distinct",
                 "errors", "rule"],
    "properties": {
        "model_id": {"type": "string"},
        "value": {"type": "number"},
        "score": {"enum": ["angular_similarity", "knn_normalised"]},
        "knn": {"type": ["object", "null"], "required": ["k", "beta"]},
        "labels": {"type": "string"},
        "previous": {"type": "object", "required": ["value", "source"]},
        "labelled_pairs": {"type": "integer", "minimum": 1},
        "duplicates": {"type": "integer", "minimum": 0},
        "distinct": {"type": "integer", "minimum": 0},
        "errors": {"type": "integer", "minimum": 0},
        "precision_labelled_95": {"type": ["array", "null"], "items": {"type": "number"}},
        "rule": {"type": "string"},
    },
    # kNN-normalised thresholds say how the score was made
    "if": {"properties": {"score": {"const": "knn_normalised"}}},
    "then": {"properties": {"knn": {"type": "object"}}, "required": ["knn"]},
})


def validate_review_threshold(document: Any) -> dict:
    """Check a review_threshold.json document; raises SchemaError naming the field."""
    return _validate(document, REVIEW_THRESHOLD_SCHEMA, "review_threshold.json")


def _validate(document: Any, schema: dict, what: str) -> dict:
    err = jsonschema.exceptions.best_match(_validator(schema).iter_errors(document))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise SchemaError(f"{what}: at {where}: {err.message}")
    return document


# id(schema) -> (schema, its validator). jsonschema.validate checks the schema itself at every call (18 ms for
# a match_run.json, measured; 0.3 ms once checked); the schemas are this module's constants,
# so each is checked once per process. The schema is kept beside its validator so that its id stays its own.
_VALIDATORS: dict[int, tuple[dict, Any]] = {}


def _validator(schema: dict):
    """jsonschema.validate's validator for `schema` (the draft it declares, else the latest), checked once."""
    cached = _VALIDATORS.get(id(schema))
    if cached is None or cached[0] is not schema:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        cached = _VALIDATORS[id(schema)] = (schema, cls(schema))
    return cached[1]


def validate_match_run(document: Any, path: str = "match_run.json") -> dict:
    """Check a match_run.json document (read from or written to `path`, which the error names); raises
    SchemaError naming the file and the field."""
    return _validate(document, MATCH_RUN_SCHEMA, path)


def validate_report(report: Any) -> dict:
    """Check a report.json document; raises SchemaError naming the field."""
    return _validate(report, REPORT_SCHEMA, "report.json")


def validate_model_card(card: Any) -> dict:
    """Check a model_card.json document; raises SchemaError naming the field."""
    return _validate(card, MODEL_CARD_SCHEMA, "model_card.json")
