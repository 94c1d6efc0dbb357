import gzip
import os

import numpy as np
import pytest

from trainer.data import load_fashion_mnist, read_idx


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_reads_idx_files(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    labels = np.array([3, 9])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = load_fashion_mnist("test", data_dir=str(tmp_path))
    assert x.dtype == np.uint8 and x.shape == (2, 28, 28)
    np.testing.assert_array_equal(x, images)
    assert y.dtype == np.int64 and y.tolist() == [3, 9]


def test_env_var_and_missing_files_name_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="5 values"):
        read_idx(str(path))


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
                    and not os.environ.get("FASHION_MNIST_DIR"), reason="Fashion-MNIST not installed")
def test_real_test_split():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10
    assert int(x.max()) == 255 and int(x.min()) == 0
