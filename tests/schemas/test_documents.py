import pytest

from schemas import SchemaError, validate_model_card, validate_report


def card(**overrides):
    document = {
        "model_id": "0123456789abcdef",
        "embedding_dim": 64,
        "input_spec": {"height": 28, "width": 28, "channels": 1, "dtype": "uint8", "value_range": [0, 255]},
        "training": {},
        "data": {},
        "metrics": {},
        "thresholds": {
            "instance": [
                {"target_fmr": 1e-3, "angular_similarity": 0.9, "cosine": 0.95, "impostor_pairs": 5000,
                 "fmr": 8e-4, "fmr_upper_95": 1.5e-3, "fnmr": 0.01}
            ]
        },
    }
    document.update(overrides)
    return document


def test_model_card_validates_and_names_the_bad_field():
    validate_model_card(card())
    with pytest.raises(SchemaError, match="at input_spec/channels"):
        validate_model_card(card(input_spec={"height": 28, "width": 28, "channels": 2, "dtype": "uint8", "value_range": [0, 255]}))
    with pytest.raises(SchemaError, match="'model_id' is a required property"):
        bad = card()
        del bad["model_id"]
        validate_model_card(bad)


def test_report_requires_counts():
    report = {
        "model_id": "m", "run_id": "r",
        "threshold": {"value": 0.9, "score": "angular_similarity", "angular_similarity": 0.9, "cosine": 0.95,
                      "source": "given"},
        "counts": {"items": 3, "failures": 0, "pairs": 1, "clusters": 1, "items_to_drop": 1},
        "similarity_histogram": {"bin_edges": [0.9, 1.0], "counts": [1], "of": "matched pairs"},
        "outputs": {"report_html": "report.html"},
    }
    validate_report(report)
    report["counts"]["items"] = -1
    with pytest.raises(SchemaError, match="at counts/items"):
        validate_report(report)
