"""Encoder artefact round trip: safe-mode load, same outputs, same model_id, a card that validates."""
import json
import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from schemas.documents import validate_model_card
from schemas.tables import SchemaError
from trainer.encoder import build_encoder
from trainer.export import export_encoder, load_encoder, load_model_card, model_id_of

THRESHOLDS = {
    "instance": [{"target_fmr": 0.01, "angular_similarity": 0.8, "cosine": float(np.cos(np.pi * 0.2)),
                  "impostor_pairs": 4950, "fmr": 0.0097, "fmr_upper_95": 0.0128, "fnmr": 0.02}],
    "class": [],
}


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(0)
    return build_encoder(embedding_dim=8, filters=(4, 8), dense_units=16, batch_norm=True)


def _export(model, out_dir, **kw):
    return export_encoder(model, str(out_dir), training={"epochs": 1, "margin": np.float32(0.4)},
                          data={"dataset": "test"}, metrics={"seed_auc": np.float64(0.5)},
                          thresholds=THRESHOLDS, **kw)


def test_round_trip_same_outputs_and_id(tiny_model, tmp_path):
    card = _export(tiny_model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "model_card.json"]
    assert card["model_id"] == model_id_of(tiny_model)
    assert len(card["model_id"]) == 16 and int(card["model_id"], 16) >= 0
    assert card["embedding_dim"] == 8
    assert card["input_spec"] == {"height": 28, "width": 28, "channels": 1, "dtype": "uint8",
                                  "value_range": [0, 255]}
    assert card["training"]["margin"] == pytest.approx(0.4)  # numpy scalar written as a plain number
    validate_model_card(card)

    model, loaded_card = load_encoder(str(tmp_path))
    assert loaded_card == card
    assert model_id_of(model) == card["model_id"]
    pixels = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1)).astype(np.float32)
    want = tiny_model.predict(pixels, verbose=0)
    got = model.predict(pixels, verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert load_model_card(str(tmp_path)) == card


def test_model_id_is_sha256_prefix_of_weights(tiny_model):
    import hashlib
    h = hashlib.sha256()
    for w in tiny_model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    assert model_id_of(tiny_model) == h.hexdigest()[:16]
    other = build_encoder(embedding_dim=8, filters=(4, 8), dense_units=16, batch_norm=True)
    assert model_id_of(other) != model_id_of(tiny_model)


def test_card_dim_mismatch_is_a_clear_error(tiny_model, tmp_path):
    _export(tiny_model, tmp_path)
    path = tmp_path / "model_card.json"
    card = json.loads(path.read_text())
    card["embedding_dim"] = 9
    path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="embedding_dim=9"):
        load_encoder(str(tmp_path))


def test_card_for_other_weights_is_refused(tiny_model, tmp_path):
    _export(tiny_model, tmp_path)
    path = tmp_path / "model_card.json"
    card = json.loads(path.read_text())
    card["model_id"] = "0123456789abcdef"
    path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="model_id"):
        load_encoder(str(tmp_path))


def test_invalid_thresholds_are_refused_before_writing(tiny_model, tmp_path):
    bad = {"class": [{"target_fmr": 0.01}]}
    with pytest.raises(SchemaError, match="thresholds"):
        export_encoder(tiny_model, str(tmp_path / "m"), training={}, data={}, metrics={}, thresholds=bad)
    assert not (tmp_path / "m" / "model.keras").exists()


def test_missing_artefact(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model_card(str(tmp_path))
