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
    report["counts"]["items"] = 3
    report["curves"] = {"genuine_pairs": 1, "impostor_pairs": 2, "auc": 1.2, "eer": {}, "at_fmr": [], "points": [],
                        "resolution": 1e-3}
    with pytest.raises(SchemaError, match="at curves/auc"):
        validate_report(report)
    report["curves"]["auc"] = 0.9
    validate_report(report)
    report["near_threshold"] = {"above": [{"left_id": "a", "right_id": "b", "score": 0.9}], "below": [],
                                "below_of": "all"}
    with pytest.raises(SchemaError, match="at near_threshold/above/0"):
        validate_report(report)


def test_review_threshold_needs_knn_for_normalised_scores():
    from schemas.documents import validate_review_threshold

    doc = {"model_id": "m", "value": 0.4, "score": "knn_normalised", "knn": {"k": 10, "beta": 0.5},
           "labels": "pairs.csv", "previous": {"value": 0.5, "source": "given"}, "labelled_pairs": 4,
           "duplicates": 2, "distinct": 2, "errors": 0, "rule": "fewest disagreements"}
    validate_review_threshold(doc)
    del doc["knn"]
    with pytest.raises(SchemaError, match="knn"):
        validate_review_threshold(doc)
    doc.update(score="angular_similarity", labelled_pairs=0)
    with pytest.raises(SchemaError, match="labelled_pairs"):
        validate_review_threshold(doc)


def test_match_run_is_checked_naming_the_file():
    from schemas.documents import validate_match_run

    doc = {"run_id": "r1", "model_id": "m", "mode": "all_pairs", "search": "exact", "items": 10, "pairs": 2,
           "threshold": {"value": 0.9, "score": "angular_similarity", "angular_similarity": 0.9, "cosine": 0.95,
                         "source": "given", "target_fmr": None, "impostor_pairs": None}}
    assert validate_match_run(doc, "work/match_run.json") is doc
    knn = {**doc, "threshold": {**doc["threshold"], "score": "knn_normalised", "angular_similarity": None,
                                "cosine": None}}
    with pytest.raises(SchemaError, match="knn"):
        validate_match_run(knn, "work/match_run.json")
    validate_match_run({**knn, "threshold": {**knn["threshold"], "knn": {"k": 10, "beta": 0.5}}})
    del doc["threshold"]
    with pytest.raises(SchemaError, match=r"^work/match_run.json: at \(top level\): 'threshold' is a required"):
        validate_match_run(doc, "work/match_run.json")
    with pytest.raises(SchemaError, match="at pairs"):
        validate_match_run({**doc, "threshold": knn["threshold"] | {"knn": {}}, "pairs": -1}, "match_run.json")


def test_each_schema_is_checked_once_and_reports_as_jsonschema_validate(monkeypatch):
    import jsonschema

    from schemas import documents

    checked = []
    real_check = jsonschema.Draft202012Validator.check_schema.__func__
    monkeypatch.setattr(jsonschema.Draft202012Validator, "check_schema",
                        classmethod(lambda cls, schema, **kw: checked.append(id(schema)) or real_check(cls, schema, **kw)))
    monkeypatch.setattr(documents, "_VALIDATORS", {})
    bad = card(embedding_dim="64")
    for _ in range(3):
        validate_model_card(card())
        with pytest.raises(SchemaError) as raised:
            validate_model_card(bad)
    assert checked == [id(documents.MODEL_CARD_SCHEMA)]
    with pytest.raises(jsonschema.ValidationError) as plain:
        jsonschema.validate(bad, documents.MODEL_CARD_SCHEMA)
    assert str(raised.value) == f"model_card.json: at embedding_dim: {plain.value.message}"
