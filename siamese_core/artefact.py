"""The encoder artefact: `model.keras` (single tower) + `model_card.json`, in a local or gs:// directory.

The model_id hashes everything that decides an embedding: every weight array's bytes (in
`model.get_weights()` order) and the input spec the pipelines decode to (size, channels, value range,
border trimming), so two artefacts with the same id compute the same embeddings and templates of different
models, or of one model fed differently, are never matched against each other. The card also records
`artifact_sha256`, the hash of the model.keras file: `load_encoder` checks it before anything is
deserialized (a file swapped or damaged after export is refused unopened), then recomputes the model_id
from the loaded weights and the card's input spec (a card edited after export is refused).
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
from schemas.tables import SchemaError

MODEL_FILE = "model.keras"
CARD_FILE = "model_card.json"
# 2: model_id covers the input spec; artifact_sha256 is recorded.
CARD_VERSION = 2
_HASH_CHUNK = 1 << 20


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def model_id_of(model, input_spec: dict) -> str:
    """First 16 hex digits of sha256 over the bytes of all weight arrays of `model`, in order, then the
    canonical JSON of `input_spec` (what the pipelines decode images to before the model sees them)."""
    digest = hashlib.sha256()
    for w in model.get_weights():
        digest.update(np.ascontiguousarray(w).tobytes())
    digest.update(_canonical(input_spec))
    return digest.hexdigest()[:16]


def file_sha256(path: str) -> str:
    """Hex sha256 of the local file `path`, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
                   input_spec: dict | None = None, hard_negatives: dict | None = None) -> dict:
    """Write `out_dir/model.keras` and `out_dir/model_card.json`; return the card.

    Args:
      model: the single-tower encoder (raw pixels (batch, H, W, C) float32 -> unit vectors (batch, dim)).
      out_dir: local directory or gs:// URI (created if needed).
      training / data / metrics: free-form dicts recorded in the card (config, data description, scores).
      thresholds: {"instance": [THRESHOLD_SCHEMA, ...], "class": [...]} (see trainer.evaluate).
      input_spec: defaults to the model's input shape with uint8 pixels in [0, 255].
      hard_negatives: the record of `train --hard_negatives` ({"file", "pairs_given", "pairs_used",
        "skipped": {reason: count}, "new_items"}; trainer.hard_negatives), None (null) without it.
    Raises SchemaError if the card does not validate (nothing is written then).
    """
    input_spec = dict(input_spec) if input_spec is not None else _input_spec_of(model)
    card = {
        "card_version": CARD_VERSION,
        "model_id": model_id_of(model, input_spec),
        "embedding_dim": int(model.output_shape[-1]),
        "input_spec": input_spec,
        "output": {"dtype": "float32", "normalised": "L2", "similarity": "angular = 1 - arccos(cos)/pi"},
        "training": training,
        "data": data,
        "metrics": metrics,
        "thresholds": thresholds,
        "hard_negatives": hard_negatives,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "keras_version": _keras_version(),
    }
    # Round trip through JSON so numpy scalars become plain numbers before validation.
    card = json.loads(json.dumps(card, default=_jsonable))
    validate_model_card({**card, "artifact_sha256": "0" * 64})  # nothing is written for a bad card

    if _is_remote(out_dir):
        with tempfile.TemporaryDirectory() as tmp:
            card = _write_local(model, card, tmp)
            for name in (MODEL_FILE, CARD_FILE):
                _copy_to_remote(os.path.join(tmp, name), _join(out_dir, name))
    else:
        os.makedirs(out_dir, exist_ok=True)
        card = _write_local(model, card, out_dir)
    return card


def load_model_card(model_dir: str) -> dict:
    """Read and validate `model_dir/model_card.json` (local or gs://). No TensorFlow needed.

    Raises FileNotFoundError when there is none, ValueError naming the file when it is not JSON, not a
    card (SchemaError) or a card of an older export (no artifact_sha256).
    """
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
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a model card (not UTF-8 text: {err})") from None
    try:
        card = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a model card (invalid JSON: {err})") from None
    try:
        validate_model_card(card)
    except SchemaError as err:
        raise SchemaError(f"{path}: {err}") from None
    if "artifact_sha256" not in card or card.get("card_version", 1) < CARD_VERSION:
        raise ValueError(f"{path}: a card of an older export (version {card.get('card_version', 1)}, no "
                         "artifact_sha256): its model_id does not cover the input spec; export the model again "
                         "(siamese-dedup train)")
    return card


def _check_file(path: str, card: dict, model_dir: str) -> None:
    """Refuse `path` (a local copy of model.keras) unless its sha256 is the card's artifact_sha256."""
    got = file_sha256(path)
    if got != card["artifact_sha256"]:
        raise ValueError(f"{_join(model_dir, MODEL_FILE)}: the file's sha256 is {got[:16]}..., model_card.json "
                         f"says {card['artifact_sha256'][:16]}...: the file was replaced or damaged after export, "
                         "or the card belongs to another export; it was not opened")


def _deserialize(path: str, model_dir: str):
    import keras

    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as err:  # Keras raises ValueError, TypeError, OSError, zipfile errors... for bad files
        raise ValueError(f"{_join(model_dir, MODEL_FILE)}: not a loadable Keras model "
                         f"({type(err).__name__}: {str(err)[:300]})") from err


def load_encoder(model_dir: str):
    """Load the encoder artefact from `model_dir` (local or gs://) -> (keras.Model, card).

    Order matters: the card is read and validated; the model file's sha256 is checked against the card
    before it is deserialized; it is loaded in Keras safe mode (no Lambda layers, no arbitrary code); the
    model is checked against the card: output dimension equals card["embedding_dim"] and weights + input
    spec hash to card["model_id"] (so neither the weights nor the input spec changed since export).
    """
    card = load_model_card(model_dir)
    if _is_remote(model_dir):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, MODEL_FILE)
            _copy_from_remote(_join(model_dir, MODEL_FILE), local)
            _check_file(local, card, model_dir)
            model = _deserialize(local, model_dir)
    else:
        path = os.path.join(model_dir, MODEL_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {MODEL_FILE} in {model_dir}")
        _check_file(path, card, model_dir)
        model = _deserialize(path, model_dir)

    dim = int(model.output_shape[-1])
    if dim != card["embedding_dim"]:
        raise ValueError(f"{model_dir}: model outputs {dim}-d embeddings but model_card.json says "
                         f"embedding_dim={card['embedding_dim']}")
    got = model_id_of(model, card["input_spec"])
    if got != card["model_id"]:
        raise ValueError(f"{model_dir}: weights and input spec hash to model_id {got} but model_card.json says "
                         f"{card['model_id']}: the card's input_spec or model_id was edited after export, or the "
                         "card belongs to another export")
    return model, card


# --- file helpers -----------------------------------------------------------------------------------------

def _keras_version() -> str:
    import keras
    return keras.__version__


def _write_local(model, card: dict, out_dir: str) -> dict:
    """Save the model, record its file hash in `card`, validate and write the card; returns the card."""
    # Write to temporary names then rename, so a reader never sees a half-written artefact.
    model_tmp = os.path.join(out_dir, MODEL_FILE + ".tmp.keras")
    card_tmp = os.path.join(out_dir, CARD_FILE + ".tmp")
    model.save(model_tmp)
    card = {**card, "artifact_sha256": file_sha256(model_tmp)}
    try:
        validate_model_card(card)
    except Exception:
        os.remove(model_tmp)
        raise
    with open(card_tmp, "w", encoding="utf-8") as f:
        json.dump(card, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(model_tmp, os.path.join(out_dir, MODEL_FILE))
    os.replace(card_tmp, os.path.join(out_dir, CARD_FILE))
    return card


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
