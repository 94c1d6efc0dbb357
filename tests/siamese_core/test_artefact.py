"""Encoder artefact round trip: safe-mode load, same outputs, same model_id, a card that validates."""
import json
import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from schemas.documents import validate_model_card
from schemas.tables import SchemaError
from trainer.encoder import build_encoder
from siamese_core.artefact import export_encoder, file_sha256, load_encoder, load_model_card, model_id_of

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
    assert card["model_id"] == model_id_of(tiny_model, card["input_spec"])
    assert card["artifact_sha256"] == file_sha256(str(tmp_path / "model.keras"))
    assert len(card["model_id"]) == 16 and int(card["model_id"], 16) >= 0
    assert card["embedding_dim"] == 8
    assert card["input_spec"] == {"height": 28, "width": 28, "channels": 1, "dtype": "uint8",
                                  "value_range": [0, 255]}
    assert card["training"]["margin"] == pytest.approx(0.4)  # numpy scalar written as a plain number
    validate_model_card(card)

    model, loaded_card = load_encoder(str(tmp_path))
    assert loaded_card == card
    assert model_id_of(model, card["input_spec"]) == card["model_id"]
    pixels = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1)).astype(np.float32)
    want = tiny_model.predict(pixels, verbose=0)
    got = model.predict(pixels, verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert load_model_card(str(tmp_path)) == card


SPEC = {"height": 28, "width": 28, "channels": 1, "dtype": "uint8", "value_range": [0, 255]}


def test_model_id_is_sha256_prefix_of_weights_and_input_spec(tiny_model):
    import hashlib
    h = hashlib.sha256()
    for w in tiny_model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    h.update(json.dumps(SPEC, sort_keys=True, separators=(",", ":")).encode())
    assert model_id_of(tiny_model, SPEC) == h.hexdigest()[:16]
    other = build_encoder(embedding_dim=8, filters=(4, 8), dense_units=16, batch_norm=True)
    assert model_id_of(other, SPEC) != model_id_of(tiny_model, SPEC)
    # Everything that decides an embedding: the same weights fed differently are another model.
    for change in ({"value_range": [0, 1]}, {"trim_borders": True}, {"height": 32}):
        assert model_id_of(tiny_model, {**SPEC, **change}) != model_id_of(tiny_model, SPEC)


def _edit_card(model_dir, **changes):
    path = model_dir / "model_card.json"
    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps(card))
    return card


def test_input_spec_edited_after_export_is_refused(tiny_model, tmp_path):
    """The probe: value_range edited to [0, 1] embedded at cosine -0.5..0.04 to the true embeddings under
    the same model_id. Now the card no longer hashes to its model_id."""
    card = _export(tiny_model, tmp_path)
    _edit_card(tmp_path, input_spec={**card["input_spec"], "value_range": [0, 1]})
    with pytest.raises(ValueError, match="input_spec or model_id was edited"):
        load_encoder(str(tmp_path))


def test_model_file_is_checked_before_it_is_deserialized(tiny_model, tmp_path, monkeypatch):
    _export(tiny_model, tmp_path)
    opened = []
    monkeypatch.setattr(keras.models, "load_model", lambda *a, **k: opened.append(a))
    with open(tmp_path / "model.keras", "ab") as f:
        f.write(b"\0")  # damaged (or swapped) after export
    with pytest.raises(ValueError, match="sha256 .* it was not opened"):
        load_encoder(str(tmp_path))
    assert opened == []


def test_a_png_saved_as_model_keras_is_a_clear_error(tiny_model, tmp_path):
    """The probe said 'File not found' about a file that exists."""
    from PIL import Image

    _export(tiny_model, tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "model.keras", format="PNG")
    _edit_card(tmp_path, artifact_sha256=file_sha256(str(tmp_path / "model.keras")))  # card and file agree
    with pytest.raises(ValueError, match="model.keras: not a loadable Keras model"):
        load_encoder(str(tmp_path))


def test_invalid_json_card_names_the_file(tiny_model, tmp_path):
    _export(tiny_model, tmp_path)
    (tmp_path / "model_card.json").write_text('{"model_id": ')
    with pytest.raises(ValueError, match=r"model_card.json: not a model card \(invalid JSON"):
        load_model_card(str(tmp_path))


def test_card_of_an_older_export_is_refused(tiny_model, tmp_path):
    card = _export(tiny_model, tmp_path)
    del card["artifact_sha256"]
    card["card_version"] = 1
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="older export"):
        load_model_card(str(tmp_path))


def _rewrite_config(model_path, edit) -> None:
    """Rewrite config.json inside the .keras zip with `edit(config)`."""
    import zipfile

    with zipfile.ZipFile(model_path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(model_path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_malicious_models_are_refused_by_safe_mode(tmp_path):
    """The probes of a hostile artefact whose card matches it (the attacker wrote both): a Lambda layer,
    and a config that names a function of another module (CVE-2025-1550, fixed in Keras 3.9)."""
    marker = tmp_path / "pwned"
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Lambda(lambda t: t * 2.0)(x)
    lam = keras.Model(inputs, keras.layers.UnitNormalization()(x))
    _export(lam, tmp_path / "lambda")
    with pytest.raises(ValueError, match="not a loadable Keras model"):
        load_encoder(str(tmp_path / "lambda"))

    plain = keras.Model(inputs, keras.layers.UnitNormalization()(keras.layers.Dense(4)(keras.layers.Flatten()(inputs))))
    _export(plain, tmp_path / "inject")

    def inject(config):
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Dense":
                layer["config"]["activation"] = {"module": "os", "class_name": "system",
                                                 "config": f"touch {marker}", "registered_name": "system"}

    _rewrite_config(tmp_path / "inject" / "model.keras", inject)
    _edit_card(tmp_path / "inject", artifact_sha256=file_sha256(str(tmp_path / "inject" / "model.keras")))
    with pytest.raises(ValueError, match="not a loadable Keras model"):
        load_encoder(str(tmp_path / "inject"))
    assert not marker.exists()


def test_keras_is_pinned_to_a_release_with_the_safe_mode_fixes():
    from packaging.version import Version

    assert Version(keras.__version__) >= Version("3.9")
    setup = open(os.path.join(os.path.dirname(__file__), "..", "..", "setup.py")).read()
    assert '"keras>=3.9' in setup


def test_card_dim_mismatch_is_a_clear_error(tiny_model, tmp_path):
    _export(tiny_model, tmp_path)
    path = tmp_path / "model_card.json"
    card = json.loads(path.read_text())
    card["embedding_dim"] = 9
    path.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="embedding_dim=9"):
        load_encoder(str(tmp_path))


def test_card_for_other_weights_is_refused(tiny_model, tmp_path):
    _export(tiny_model, tmp_path)  # the card's model_id no longer matches the weights
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
