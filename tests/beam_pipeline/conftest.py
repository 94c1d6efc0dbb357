"""Fixtures of the beam_pipeline tests: image bytes in any format, small catalogues on disk."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

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
