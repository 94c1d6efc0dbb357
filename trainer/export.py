"""The encoder artefact: `model.keras` (single tower) + `model_card.json`, in a local or gs:// directory.

The model_id is a content hash of the weights (first 16 hex digits of sha256 over every weight array's
bytes, in `model.get_weights()` order), so two artefacts with the same id compute the same embeddings and
templates of different models are never matched against each other.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from schemas.documents import validate_model_card

MODEL_FILE = "model.keras"
CARD_FILE = "model_card.json"
CARD_VERSION = 1


def model_id_of(model) -> str:
    """First 16 hex digits of sha256 over the bytes of all weight arrays of `model`, in order."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """Numpy scalars/arrays and tuples -> plain JSON types (json.dump calls this for what it cannot write)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"model card: cannot write {type(value).__name__} as JSON")


def _input_spec_of(model) -> dict:
    _, height, width, channels = model.input_shape
    return {"height": int(height), "width": int(width), "channels": int(channels),
            "dtype": "uint8", "value_range": [0, 255]}


def export_encoder(model, out_dir: str, *, training: dict, data: dict, metrics: dict, thresholds: dict,
                   input_spec: dict | None = None) -> dict:
    """Write `out_dir/model.keras` and `out_dir/model_card.json`; return the card.

    Args:
      model: the single-tower encoder (raw pixels (batch, H, W, C) float32 -> unit vectors (batch, dim)).
      out_dir: local directory or gs:// URI (created if needed).
      training / data / metrics: free-form dicts recorded in the card (config, data description, scores).
      thresholds: {"instance": [THRESHOLD_SCHEMA, ...], "class": [...]} (see trainer.evaluate).
      input_spec: defaults to the model's input shape with uint8 pixels in [0, 255].
    Raises SchemaError if the card does not validate (nothing is written then).
    """
    card = {
        "card_version": CARD_VERSION,
        "model_id": model_id_of(model),
        "embedding_dim": int(model.output_shape[-1]),
        "input_spec": dict(input_spec) if input_spec is not None else _input_spec_of(model),
        "output": {"dtype": "float32", "normalised": "L2", "similarity": "angular = 1 - arccos(cos)/pi"},
        "training": training,
        "data": data,
        "metrics": metrics,
        "thresholds": thresholds,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "keras_version": _keras_version(),
    }
    # Round trip through JSON so numpy scalars become plain numbers before validation.
    card = json.loads(json.dumps(card, default=_jsonable))
    validate_model_card(card)

    if _is_remote(out_dir):
        with tempfile.TemporaryDirectory() as tmp:
            _write_local(model, card, tmp)
            for name in (MODEL_FILE, CARD_FILE):
                _copy_to_remote(os.path.join(tmp, name), _join(out_dir, name))
    else:
        os.makedirs(out_dir, exist_ok=True)
        _write_local(model, card, out_dir)
    return card


def load_model_card(model_dir: str) -> dict:
    """Read and validate `model_dir/model_card.json` (local or gs://). No TensorFlow needed."""
    path = _join(model_dir, CARD_FILE)
    try:
        if _is_remote(model_dir):
            from apache_beam.io.filesystems import FileSystems
            with FileSystems.open(path) as f:
                text = f.read().decode("utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except (OSError, IOError) as err:
        raise FileNotFoundError(f"no model card at {path}: {err}") from err
    return validate_model_card(json.loads(text))


def load_encoder(model_dir: str):
    """Load the encoder artefact from `model_dir` (local or gs://) -> (keras.Model, card).

    Loads with Keras safe mode, validates the card, and checks the model against it: output dimension equals
    card["embedding_dim"] and the weights hash to card["model_id"] (so a card never describes other weights).
    """
    import keras

    card = load_model_card(model_dir)
    if _is_remote(model_dir):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, MODEL_FILE)
            _copy_from_remote(_join(model_dir, MODEL_FILE), local)
            model = keras.models.load_model(local, safe_mode=True, compile=False)
    else:
        path = os.path.join(model_dir, MODEL_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no {MODEL_FILE} in {model_dir}")
        model = keras.models.load_model(path, safe_mode=True, compile=False)

    dim = int(model.output_shape[-1])
    if dim != card["embedding_dim"]:
        raise ValueError(f"{model_dir}: model outputs {dim}-d embeddings but model_card.json says "
                         f"embedding_dim={card['embedding_dim']}")
    got = model_id_of(model)
    if got != card["model_id"]:
        raise ValueError(f"{model_dir}: weights hash to model_id {got} but model_card.json says "
                         f"{card['model_id']} (model.keras and the card come from different exports)")
    return model, card


# --- file helpers -----------------------------------------------------------------------------------------

def _keras_version() -> str:
    import keras
    return keras.__version__


def _write_local(model, card: dict, out_dir: str) -> None:
    # Write to temporary names then rename, so a reader never sees a half-written artefact.
    model_tmp = os.path.join(out_dir, MODEL_FILE + ".tmp.keras")
    card_tmp = os.path.join(out_dir, CARD_FILE + ".tmp")
    model.save(model_tmp)
    with open(card_tmp, "w", encoding="utf-8") as f:
        json.dump(card, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(model_tmp, os.path.join(out_dir, MODEL_FILE))
    os.replace(card_tmp, os.path.join(out_dir, CARD_FILE))


def _is_remote(path: str) -> bool:
    return "://" in path


def _join(base: str, name: str) -> str:
    if _is_remote(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def _copy_to_remote(local: str, remote: str) -> None:
    from apache_beam.io.filesystems import FileSystems
    with open(local, "rb") as src, FileSystems.create(remote) as dst:
        shutil.copyfileobj(src, dst)


def _copy_from_remote(remote: str, local: str) -> None:
    from apache_beam.io.filesystems import FileSystems
    try:
        src = FileSystems.open(remote)
    except Exception as err:  # Beam raises its own IOError subclasses per filesystem.
        raise FileNotFoundError(f"cannot open {remote}: {err}") from err
    with src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst)
