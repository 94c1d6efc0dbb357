"""Fashion-MNIST from its IDX files (the Debian package `dataset-fashion-mnist` installs them).

No TensorFlow here: the arrays are plain numpy.
"""
from __future__ import annotations

import gzip
import os

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "FASHION_MNIST_DIR"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8}


def fashion_mnist_dir(data_dir: str | None = None) -> str:
    """The directory holding the IDX files: `data_dir`, else $FASHION_MNIST_DIR, else the Debian path."""
    return data_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally .gz) into an array of its stored shape (uint8 only)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unsupported IDX element type 0x{code:02x}")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} values), file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=_IDX_DTYPES[code], offset=offset).reshape(shape)


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}.gz not found in {directory}. Install it with "
        f"`sudo apt-get install dataset-fashion-mnist` (apt package dataset-fashion-mnist), or point "
        f"--data_dir / ${ENV_VAR} at a directory holding the four IDX .gz files.")


def load_fashion_mnist(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a Fashion-MNIST split.

    Args:
      split: "train" (60,000 images) or "test" (10,000 images).
      data_dir: directory of the IDX files; default $FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist.
    Returns:
      images: uint8 (n, 28, 28), pixel values 0..255 (0 = background).
      labels: int64 (n,), class ids 0..9 (names in CLASS_NAMES).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = fashion_mnist_dir(data_dir)
    image_stem, label_stem = _FILES[split]
    images = read_idx(_find(directory, image_stem))
    labels = read_idx(_find(directory, label_stem)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match")
    return np.array(images), labels  # np.array: writable copy, not a view of the file bytes
