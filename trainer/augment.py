"""Near-duplicate edits: the ONE definition used to train the encoder and to plant copies in the demo.

A copy made here should still be "the same photo" to a person: a small shift / crop-and-resize, a small
rotation, maybe a horizontal mirror, brightness and contrast jitter, and JPEG-like blocking (8x8 DCT
quantisation) plus a little sensor noise. Everything is vectorised over a batch in numpy (no Python loop
per image), so training can augment tens of thousands of images per epoch for a few seconds of CPU.

Ranges (per image, drawn independently):
  rotation          uniform +-7 degrees
  scale (zoom)      uniform 0.96 .. 1.08 (> 1 = crop-and-resize inwards)
  shift             uniform +-1.5 pixels in x and y (for 28x28; scales with image size)
  horizontal flip   probability 0.1
  contrast          x (1 +- 0.2) around the image mean;  brightness +- 16 grey levels
  JPEG-like         probability 0.5, quality 40..90 (standard luminance table, per channel)
  noise             Gaussian, sigma 0..3 grey levels
Geometry samples bilinearly and clamps at the border (replicates edge pixels) rather than filling black,
which would be an artefact in photos whose background is not black.
"""
from __future__ import annotations

import numpy as np

MAX_ROTATION_DEG = 7.0
SCALE_RANGE = (0.96, 1.08)
MAX_SHIFT_FRACTION = 1.5 / 28.0
FLIP_PROB = 0.1
CONTRAST_JITTER = 0.2
BRIGHTNESS_JITTER = 16.0
JPEG_PROB = 0.5
JPEG_QUALITY_RANGE = (40, 90)
MAX_NOISE_SIGMA = 3.0

# The JPEG standard's luminance quantisation table (ITU-T T.81, Annex K.1), for quality 50.
_JPEG_LUMA_Q50 = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
], dtype=np.float32)


def _dct_matrix(n: int = 8) -> np.ndarray:
    """Orthonormal DCT-II matrix D (n, n): coefficients = D @ block @ D.T."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


_DCT8 = _dct_matrix(8)
_DCT8x8 = np.kron(_DCT8, _DCT8)  # acts on row-major flattened 8x8 blocks


def _jpeg_quant_tables(quality: np.ndarray) -> np.ndarray:
    """libjpeg's quality scaling of the luminance table: quality (n,) in 1..100 -> tables (n, 8, 8)."""
    q = np.clip(quality.astype(np.float32), 1, 100)
    scale = np.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    tables = np.floor((_JPEG_LUMA_Q50[None] * scale[:, None, None] + 50.0) / 100.0)
    return np.clip(tables, 1, 255)


def _affine_warp(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random similarity transform (+ maybe mirror) of float images x (n, H, W, C), bilinear, edge-clamped."""
    n, h, w, _ = x.shape
    theta = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n))
    scale = rng.uniform(*SCALE_RANGE, n)
    shift = rng.uniform(-MAX_SHIFT_FRACTION, MAX_SHIFT_FRACTION, (n, 2)) * np.array([h, w])
    flip = np.where(rng.random(n) < FLIP_PROB, -1.0, 1.0)

    # Inverse map: for each output pixel p, source = R(-theta) (p - c - shift) / scale, mirrored in x.
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32) - cy, np.arange(w, dtype=np.float32) - cx,
                         indexing="ij")
    f32 = np.float32
    oy = yy[None] - shift[:, 0, None, None].astype(f32)
    ox = xx[None] - shift[:, 1, None, None].astype(f32)
    cos = (np.cos(theta) / scale).astype(f32)[:, None, None]
    sin = (np.sin(theta) / scale).astype(f32)[:, None, None]
    sy = np.clip(cos * oy - sin * ox + f32(cy), 0, h - 1)
    sx = np.clip((sin * oy + cos * ox) * flip.astype(f32)[:, None, None] + f32(cx), 0, w - 1)

    # Bilinear interpolation with flat indices into (n*H*W, C): one np.take per corner.
    y0 = sy.astype(np.int32)  # floor: sy >= 0
    x0 = sx.astype(np.int32)
    wy = (sy - y0)[..., None]
    wx = (sx - x0)[..., None]
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    base = (np.arange(n, dtype=np.int32) * (h * w))[:, None, None]
    r0, r1 = base + y0 * w, base + y1 * w
    flat = x.reshape(n * h * w, -1)

    def corner(idx):
        return np.take(flat, idx, axis=0)

    top = corner(r0 + x0) * (1 - wx) + corner(r0 + x1) * wx
    bottom = corner(r1 + x0) * (1 - wx) + corner(r1 + x1) * wx
    return top * (1 - wy) + bottom * wy


def _photometric(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = x.shape[0]
    contrast = rng.uniform(1 - CONTRAST_JITTER, 1 + CONTRAST_JITTER, n)[:, None, None, None]
    brightness = rng.uniform(-BRIGHTNESS_JITTER, BRIGHTNESS_JITTER, n)[:, None, None, None]
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return (x - mean) * contrast.astype(np.float32) + mean + brightness.astype(np.float32)


def _jpeg_like(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """8x8 block DCT quantisation at a random quality on a random half of the images."""
    n, h, w, c = x.shape
    chosen = np.flatnonzero(rng.random(n) < JPEG_PROB)
    quality = rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1, n)
    if chosen.size == 0:
        return x
    ph, pw = -h % 8, -w % 8
    sub = np.pad(np.clip(x[chosen], 0, 255), ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge") - 128.0
    m = len(chosen)
    hb, wb = (h + ph) // 8, (w + pw) // 8
    # Blocks as rows of 64 values; the 2-D DCT of every block is one matrix product with kron(D, D).
    blocks = sub.reshape(m, hb, 8, wb, 8, c).transpose(0, 1, 3, 5, 2, 4).reshape(m, hb * wb * c, 64)
    coef = blocks @ _DCT8x8.T
    q = _jpeg_quant_tables(quality[chosen]).reshape(m, 1, 64)
    coef = np.round(coef / q) * q
    back = (coef @ _DCT8x8).reshape(m, hb, wb, c, 8, 8).transpose(0, 1, 4, 2, 5, 3)
    out = x.copy()
    out[chosen] = back.reshape(m, h + ph, w + pw, c)[:, :h, :w] + 128.0
    return out


def augment_batch(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Near-duplicate copies of a batch.

    Args:
      images: uint8 (n, H, W) or (n, H, W, C), values 0..255.
      rng: the source of randomness (a fixed seed gives the same copies).
    Returns: uint8, same shape; each image edited independently.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"augment_batch expects uint8 pixels, got {images.dtype}")
    if images.ndim not in (3, 4):
        raise ValueError(f"augment_batch expects (n, H, W) or (n, H, W, C), got shape {images.shape}")
    if images.shape[0] == 0:
        return images.copy()
    x = images.astype(np.float32)
    if x.ndim == 3:
        x = x[..., None]
    x = _affine_warp(x, rng)
    x = _photometric(x, rng)
    x = _jpeg_like(x, rng)
    sigma = rng.uniform(0, MAX_NOISE_SIGMA, x.shape[0]).astype(np.float32)[:, None, None, None]
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * sigma
    out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out.reshape(images.shape)


def augment_image(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A near-duplicate copy of one image: uint8 (H, W) or (H, W, C) -> uint8, same shape."""
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"augment_image expects (H, W) or (H, W, C), got shape {image.shape}")
    return augment_batch(image[None], rng)[0]
