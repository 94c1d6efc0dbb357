"""Resolving the match threshold: given on the command line or read from the model card."""
import json

import numpy as np
import pytest

from beam_pipeline import thresholds
from schemas.documents import validate_model_card
from siamese_core.similarity import cosine_from_angular


def _entry(fmr, sim, impostors):
    return {
        "target_fmr": fmr,
        "angular_similarity": sim,
        "cosine": float(cosine_from_angular(sim)),
        "impostor_pairs": impostors,
        "fmr": fmr / 2,
        "fmr_upper_95": fmr,
        "fnmr": 0.01,
    }


def _card():
    return validate_model_card(
        {
            "model_id": "0123456789abcdef",
            "card_version": 2,
            "artifact_sha256": "0" * 64,  # a card alone: the model file is never opened here
            "embedding_dim": 4,
            "input_spec": {"height": 28, "width": 28, "channels": 1, "dtype": "uint8", "value_range": [0, 255]},
            "training": {},
            "data": {},
            "metrics": {"recall_at_1": 0.9},
            "thresholds": {
                "instance": [_entry(1e-2, 0.80, 4000), _entry(1e-3, 0.85, 40000)],
                "class": [_entry(1e-2, 0.70, 5000)],
            },
        }
    )


def test_given_threshold():
    t = thresholds.resolve_threshold(0.75, _card(), 1e-3, "instance")
    assert t == {
        "value": 0.75,
        "score": "angular_similarity",
        "angular_similarity": 0.75,
        "cosine": float(np.cos(np.pi * 0.25)),
        "source": "given",
        "target_fmr": None,
        "impostor_pairs": None,
    }
    assert thresholds.resolve_threshold(0.5, None, 1e-3, "instance")["cosine"] == pytest.approx(0.0, abs=1e-15)


def test_card_threshold():
    t = thresholds.resolve_threshold(None, _card(), 1e-3, "instance")
    assert t["angular_similarity"] == 0.85
    assert t["cosine"] == float(cosine_from_angular(0.85))
    assert t["source"] == "model_card:instance@fmr=0.001"
    assert t["target_fmr"] == 1e-3 and t["impostor_pairs"] == 40000
    t = thresholds.resolve_threshold(None, _card(), 0.01, "class")
    assert (t["angular_similarity"], t["source"], t["impostor_pairs"]) == (0.70, "model_card:class@fmr=0.01", 5000)


def test_missing_fmr_names_the_available_ones():
    with pytest.raises(ValueError, match=r"no 'instance' threshold at FMR 0\.0001; it has FMR 0\.001, 0\.01"):
        thresholds.resolve_threshold(None, _card(), 1e-4, "instance")


def test_missing_protocol_and_missing_everything():
    card = _card()
    card["thresholds"] = {"class": card["thresholds"]["class"]}
    with pytest.raises(ValueError, match=r"protocol 'instance'.*\['class'\]"):
        thresholds.resolve_threshold(None, card, 1e-2, "instance")
    with pytest.raises(ValueError, match="pass --threshold"):
        thresholds.resolve_threshold(None, None, 1e-2, "instance")
    with pytest.raises(ValueError, match=r"\[0, 0.999\] \(float32"):
        thresholds.resolve_threshold(1.5, None, 1e-2, "instance")


def test_load_card_from_directory(tmp_path):
    from siamese_core.artefact import load_model_card

    (tmp_path / "model_card.json").write_text(json.dumps(_card()))
    assert load_model_card(str(tmp_path))["model_id"] == "0123456789abcdef"
