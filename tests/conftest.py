"""Fixtures shared by the whole suite.

The repository root goes on sys.path so `pytest` works as well as `python -m pytest`. `tiny_model_dir` is
an exported encoder artefact that is really tiny and untrained: the pipeline tests check plumbing (that
the pipeline reproduces the model's own predictions), not quality. TensorFlow is imported only by the
tests that ask for it.
"""
from __future__ import annotations

import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Fewer TF threads and log lines: the machine is small and shared.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TINY_EMBEDDING_DIM = 8


def export_tiny_encoder(out_dir: str, input_spec: dict | None = None, embedding_dim: int = TINY_EMBEDDING_DIM,
                        seed: int = 0) -> dict:
    """Build and export an untrained tiny encoder (one conv stage, no dense head) to `out_dir`; the card."""
    import keras

    from trainer.encoder import build_encoder
    from siamese_core.artefact import export_encoder

    keras.utils.set_random_seed(seed)
    model = build_encoder(input_spec, embedding_dim, filters=(4,), dense_units=0, dropout=0.0)
    return export_encoder(
        model, out_dir, training={"note": "untrained test fixture"}, data={"dataset": "none"},
        metrics={}, thresholds={"instance": [], "class": []}, input_spec=input_spec,
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Directory holding model.keras + model_card.json of an untrained 28x28x1 -> 8-d encoder."""
    out = str(tmp_path_factory.mktemp("tiny_model"))
    export_tiny_encoder(out)
    return out


@pytest.fixture(scope="session")
def tiny_rgb_model_dir(tmp_path_factory) -> str:
    """Like tiny_model_dir for 16x12 RGB input with value_range [0, 1] (the pixels are rescaled)."""
    out = str(tmp_path_factory.mktemp("tiny_rgb_model"))
    spec = {"height": 16, "width": 12, "channels": 3, "dtype": "float32", "value_range": [0, 1]}
    export_tiny_encoder(out, spec, embedding_dim=5, seed=1)
    return out


@pytest.fixture(scope="session")
def gcs_bucket():
    """A `gs://` bucket served by an in-process gcp-storage-emulator; yields 'gs://<bucket>'.

    Beam's GCS filesystem talks to it through $STORAGE_EMULATOR_HOST with an anonymous client (the
    credentials lookup, which would retry for ~25 s without any, is short-circuited).
    """
    import logging
    import socket

    emulator = pytest.importorskip("gcp_storage_emulator.server")
    from apache_beam.internal.gcp import auth

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="test-bucket")
    server.start()
    saved_env = os.environ.get("STORAGE_EMULATOR_HOST")
    saved_auth = (auth._Credentials._credentials_init, auth._Credentials._credentials)
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    auth._Credentials._credentials_init, auth._Credentials._credentials = True, None
    try:
        yield "gs://test-bucket"
    finally:
        server.stop()
        auth._Credentials._credentials_init, auth._Credentials._credentials = saved_auth
        if saved_env is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved_env


# Image bytes in any format (the decode and pipeline tests).
GRAY_28 = {"height": 28, "width": 28, "channels": 1, "dtype": "uint8", "value_range": [0, 255]}


def _encode(image, fmt: str = "PNG", **save_kwargs) -> bytes:
    """Bytes of `image` (PIL image or uint8 array) saved in format `fmt`."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


@pytest.fixture
def encode():
    """encode(image_or_array, fmt="PNG", **save_kwargs) -> bytes."""
    return _encode


@pytest.fixture
def gray_spec() -> dict:
    """The Fashion-MNIST input spec: 28x28, one channel, uint8 0..255."""
    return dict(GRAY_28)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
