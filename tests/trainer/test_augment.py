import numpy as np
import pytest

from trainer.augment import augment_batch, augment_image


def _blob(h=28, w=28):
    """A bright rectangle on black, like a Fashion-MNIST item."""
    img = np.zeros((h, w), np.uint8)
    img[6:22, 9:19] = 200
    return img


def test_same_seed_same_copy_and_dtype_shape():
    img = _blob()
    a = augment_image(img, np.random.default_rng(7))
    b = augment_image(img, np.random.default_rng(7))
    c = augment_image(img, np.random.default_rng(8))
    assert a.dtype == np.uint8 and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_copies_stay_close_to_the_original():
    rng = np.random.default_rng(0)
    img = _blob()
    copies = augment_batch(np.repeat(img[None], 200, axis=0), rng)
    # Pixel correlation with the original stays high: it is the same picture, edited.
    corr = [np.corrcoef(img.ravel().astype(float), c.ravel().astype(float))[0, 1] for c in copies]
    assert min(corr) > 0.5
    assert np.median(corr) > 0.75
    # ... and the copies really differ from the original.
    assert all(not np.array_equal(c, img) for c in copies)


def test_colour_and_batch_shapes():
    rng = np.random.default_rng(1)
    rgb = np.stack([_blob(32, 40)] * 3, axis=-1)
    out = augment_image(rgb, rng)
    assert out.shape == (32, 40, 3) and out.dtype == np.uint8
    batch = augment_batch(np.zeros((5, 28, 28), np.uint8), rng)
    assert batch.shape == (5, 28, 28)
    assert augment_batch(np.zeros((0, 28, 28), np.uint8), rng).shape == (0, 28, 28)
    with pytest.raises(TypeError):
        augment_batch(np.zeros((2, 28, 28), np.float32), rng)


def test_batch_is_fast():
    import time
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (2000, 28, 28), dtype=np.uint8)
    t = time.perf_counter()
    for i in range(0, 2000, 200):
        augment_batch(images[i:i + 200], rng)
    # ~1 s for 10,000 images on a 2-core machine; 2,000 must not take more than a couple of seconds.
    assert time.perf_counter() - t < 3.0
