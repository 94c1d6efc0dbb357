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


# --- folder / pairs / unlabelled / npz sources ---------------------------------------------------------------

SPEC = {"height": 16, "width": 16, "channels": 3, "dtype": "uint8", "value_range": [0, 255]}


def _save(path, size, mode, fmt, value):
    from PIL import Image
    colour = {"L": value, "RGB": (value, 0, 255 - value), "RGBA": (value, value, 0, 255), "P": value}[mode]
    img = Image.new("RGB" if mode == "P" else mode, size, colour)
    if mode == "P":
        img = img.convert("P")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def test_image_folder_any_size_and_mode_goes_through_decode(tmp_path):
    from trainer.data import load_image_folder
    _save(tmp_path / "cats" / "a.png", (40, 30), "RGBA", "PNG", 200)
    _save(tmp_path / "cats" / "b.jpg", (9, 20), "L", "JPEG", 100)
    _save(tmp_path / "dogs" / "c.bmp", (16, 16), "RGB", "BMP", 10)
    _save(tmp_path / "dogs" / "d.gif", (50, 50), "P", "GIF", 60)
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    data = load_image_folder(str(tmp_path), SPEC)
    images, labels = data
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 1, 1] and data.names == ["cats", "dogs"] and data.kind == "class"
    assert images[0, 8, 8].tolist() == [200, 200, 0]  # RGBA, opaque
    assert images[1, 8, 8].tolist() == [100, 100, 100]  # grey -> RGB, JPEG of a flat colour is exact
    assert images[2, 0, 0].tolist() == [10, 0, 245]


def test_pairs_layout_same_named_files_are_pairs(tmp_path):
    from trainer.data import load_pairs
    for i in range(3):
        _save(tmp_path / "left" / f"{i}.png", (20, 20), "RGB", "PNG", 10 * i)
        _save(tmp_path / "right" / f"{i}.png", (30, 10), "L", "PNG", 10 * i + 5)
    _save(tmp_path / "left" / "lonely.png", (20, 20), "RGB", "PNG", 99)  # no partner: ignored
    data = load_pairs(str(tmp_path), SPEC)
    assert data.images.shape == (6, 16, 16, 3)
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2] and data.kind == "pair"
    assert data.names == ["0.png", "1.png", "2.png"]
    assert data.images[3, 0, 0].tolist() == [15, 15, 15]  # pair 1, right-hand image (grey 15)
    with pytest.raises(ValueError, match="two subfolders"):
        load_pairs(str(tmp_path / "left"), SPEC)


def test_unlabelled_and_npz(tmp_path):
    from trainer.data import load_npz, load_source, load_unlabelled
    for i in range(3):
        _save(tmp_path / "u" / f"{i}.png", (8, 8), "L", "PNG", 50 * i)
    data = load_unlabelled(str(tmp_path / "u"), {**SPEC, "channels": 1})
    assert data.images.shape == (3, 16, 16, 1) and data.labels.tolist() == [0, 1, 2] and data.kind == "instance"
    x = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    np.savez(tmp_path / "a.npz", images=x, labels=np.array([5, 5, 9, 9]))
    got = load_npz(str(tmp_path / "a.npz"))
    assert got.images.shape == (4, 8, 8, 1) and got.labels.tolist() == [0, 0, 1, 1] and got.names == ["5", "9"]
    np.testing.assert_array_equal(got.images[..., 0], x)
    resized = load_npz(str(tmp_path / "a.npz"), SPEC)  # converted by the same decode path
    assert resized.images.shape == (4, 16, 16, 3)
    np.savez(tmp_path / "b.npz", x=x)
    assert load_source("npz", str(tmp_path / "b.npz"), None).kind == "instance"
    with pytest.raises(ValueError, match="data_path"):
        load_source("folder", None, SPEC)


def test_unlabelled_reads_a_gcs_folder_as_a_local_one(tmp_path, gcs_bucket, capsys):
    from apache_beam.io.filesystems import FileSystems

    from trainer.data import load_unlabelled
    spec = {**SPEC, "channels": 1}
    for i in range(3):
        _save(tmp_path / "u" / f"{i}.png", (8, 8), "L", "PNG", 50 * i)
    (tmp_path / "u" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "u" / "notes.txt").write_text("not an image either")
    for name in sorted(os.listdir(tmp_path / "u")):
        with FileSystems.create(f"{gcs_bucket}/cat/{name}") as f:
            f.write((tmp_path / "u" / name).read_bytes())
    with FileSystems.create(f"{gcs_bucket}/cat/deeper/3.png") as f:  # a subfolder's file is not an item
        f.write((tmp_path / "u" / "0.png").read_bytes())
    local = load_unlabelled(str(tmp_path / "u"), spec)
    remote = load_unlabelled(f"{gcs_bucket}/cat/", spec)
    np.testing.assert_array_equal(remote.images, local.images)
    assert remote.names == local.names == ["0.png", "1.png", "2.png"]
    assert remote.paths == [f"{gcs_bucket}/cat/{i}.png" for i in range(3)]
    assert capsys.readouterr().err.count("skipped 1 files that do not decode: broken.png") == 2
    with pytest.raises(FileNotFoundError, match="no image files"):
        load_unlabelled(f"{gcs_bucket}/empty", spec)
