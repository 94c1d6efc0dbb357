"""decode_image: every PIL mode to the spec's L/RGB pixels, EXIF orientation, resizing, and each failure."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from siamese_core.decode import REASONS, DecodedImage, DecodeError, decode_image, to_channels

RGB_4x6 = {"height": 4, "width": 6, "channels": 3, "dtype": "uint8", "value_range": [0, 255]}
GRAY_4x6 = {"height": 4, "width": 6, "channels": 1, "dtype": "uint8", "value_range": [0, 255]}

# PIL's luma of pure red, green and blue: (R*19595 + G*38470 + B*7471 + 2**15) >> 16.
RED_L, GREEN_L, BLUE_L = 76, 150, 29


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG file whose header claims width x height 8-bit grey pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def _filled(mode: str, value, size=(6, 4)) -> Image.Image:
    return Image.new(mode, size, value)


def _decode_l(data: bytes) -> np.ndarray:
    return decode_image(data, GRAY_4x6).pixels[:, :, 0]


# ---------------------------------------------------------------------------------------------- modes


def test_gray_png_pixels_exact(encode, gray_spec, rng):
    pixels = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    decoded = decode_image(encode(pixels), gray_spec)
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (28, 28, 1)
    assert decoded.pixels.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(decoded.pixels[:, :, 0], pixels)
    assert (decoded.width, decoded.height) == (28, 28)


def test_rgb_to_gray_uses_luma(encode):
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[:, 0:2] = (255, 0, 0)
    pixels[:, 2:4] = (0, 255, 0)
    pixels[:, 4:6] = (0, 0, 255)
    gray = _decode_l(encode(pixels))
    np.testing.assert_array_equal(gray[0], [RED_L, RED_L, GREEN_L, GREEN_L, BLUE_L, BLUE_L])


def test_gray_to_rgb_repeats_the_channel(encode, rng):
    pixels = rng.integers(0, 256, (4, 6), dtype=np.uint8)
    decoded = decode_image(encode(pixels), RGB_4x6)
    assert decoded.pixels.shape == (4, 6, 3)
    for c in range(3):
        np.testing.assert_array_equal(decoded.pixels[:, :, c], pixels)


def test_rgba_is_composited_on_white(encode):
    pixels = np.zeros((4, 6, 4), np.uint8)
    pixels[:, 0:2] = (0, 0, 0, 0)  # fully transparent -> white
    pixels[:, 2:4] = (255, 0, 0, 255)  # opaque red
    pixels[:, 4:6] = (0, 0, 0, 128)  # half-transparent black over white -> mid grey
    gray = _decode_l(encode(pixels))
    assert gray[0, 0] == 255 and gray[0, 2] == RED_L
    assert abs(int(gray[0, 4]) - 127) <= 1
    rgb = decode_image(encode(pixels), RGB_4x6).pixels
    np.testing.assert_array_equal(rgb[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgb[0, 2], [255, 0, 0])


def test_la_is_composited_on_white(encode):
    pixels = np.zeros((4, 6, 2), np.uint8)
    pixels[:, :3] = (100, 255)
    pixels[:, 3:] = (100, 0)
    gray = _decode_l(encode(Image.fromarray(pixels, mode="LA")))
    np.testing.assert_array_equal(gray[0], [100, 100, 100, 255, 255, 255])


def test_palette_and_palette_transparency(encode):
    indices = np.zeros((4, 6), np.uint8)
    indices[:, 3:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    np.testing.assert_array_equal(_decode_l(encode(image))[0], [RED_L] * 3 + [BLUE_L] * 3)
    # Index 0 transparent (PNG tRNS): white.
    np.testing.assert_array_equal(_decode_l(encode(image, transparency=0))[0], [255] * 3 + [BLUE_L] * 3)


def test_cmyk_tiff(encode):
    pixels = np.zeros((4, 6, 4), np.uint8)
    pixels[:, 0:2] = (0, 0, 0, 0)  # no ink: white
    pixels[:, 2:4] = (0, 0, 0, 255)  # black ink: black
    pixels[:, 4:6] = (255, 0, 0, 0)  # cyan: (0, 255, 255)
    data = encode(Image.fromarray(pixels, mode="CMYK"), "TIFF")
    rgb = decode_image(data, RGB_4x6).pixels
    np.testing.assert_array_equal(rgb[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(rgb[0, 2], [0, 0, 0])
    np.testing.assert_array_equal(rgb[0, 4], [0, 255, 255])


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_gray_is_scaled_not_clipped(encode, fmt):
    values = np.array([0, 257, 65535, 300, 32896, 1000], np.uint16)
    pixels = np.tile(values, (4, 1))
    gray = _decode_l(encode(Image.fromarray(pixels), fmt))
    # round(v / 257): 16-bit full scale onto 8-bit full scale.
    np.testing.assert_array_equal(gray[0], [0, 1, 255, 1, 128, 4])


def test_bilevel(encode):
    pixels = np.zeros((4, 6), bool)
    pixels[:, 3:] = True
    gray = _decode_l(encode(Image.fromarray(pixels)))
    np.testing.assert_array_equal(gray[0], [0, 0, 0, 255, 255, 255])


def test_animated_gif_uses_first_frame(encode):
    frames = [_filled("L", 10), _filled("L", 200), _filled("L", 90)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(__import__("io").BytesIO(data)).n_frames == 3
    np.testing.assert_array_equal(_decode_l(data), np.full((4, 6), 10))


def test_exif_orientation_is_applied(encode):
    stored = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40  # 3 wide, 2 tall as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = encode(Image.fromarray(stored), "PNG", exif=exif)
    spec = {"height": 3, "width": 2, "channels": 1, "dtype": "uint8", "value_range": [0, 255]}
    decoded = decode_image(data, spec)
    np.testing.assert_array_equal(decoded.pixels[:, :, 0], np.rot90(stored, k=-1))
    assert (decoded.width, decoded.height) == (2, 3)  # as displayed


def test_large_jpeg_reports_the_file_size_and_keeps_its_content(encode, gray_spec):
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(_filled("RGB", (128, 128, 128), size=(400, 300)), "JPEG", quality=95, exif=exif)
    decoded = decode_image(data, gray_spec)
    assert (decoded.width, decoded.height) == (300, 400)  # rotated by EXIF, not the reduced draft size
    assert decoded.pixels.shape == (28, 28, 1)
    assert np.abs(decoded.pixels.astype(int) - 128).max() <= 2


def test_resize_stretches_the_whole_picture(encode, gray_spec):
    # Three vertical bands on an 84x28 image: stretching keeps all three (a centre crop would keep one).
    pixels = np.zeros((28, 84), np.uint8)
    pixels[:, 28:56] = 100
    pixels[:, 56:] = 200
    decoded = decode_image(encode(pixels), gray_spec)
    assert (decoded.width, decoded.height) == (84, 28)
    row = decoded.pixels[14, :, 0]
    assert row[0] == 0 and row[13] == 100 and row[27] == 200
    constant = decode_image(encode(np.full((56, 56), 77, np.uint8)), gray_spec).pixels
    np.testing.assert_array_equal(constant, np.full((28, 28, 1), 77))


def test_unsupported_mode():
    with pytest.raises(DecodeError) as err:
        to_channels(Image.new("La", (2, 2)), 1)
    assert err.value.reason == "unsupported"


# ------------------------------------------------------------------------------------------- failures


def _reason(data: bytes, spec: dict, **kwargs) -> str:
    with pytest.raises(DecodeError) as err:
        decode_image(data, spec, **kwargs)
    assert str(err.value).startswith(err.value.reason)
    return err.value.reason


def test_failure_reasons(encode, gray_spec, rng):
    png = encode(rng.integers(0, 256, (28, 28), dtype=np.uint8))
    assert _reason(b"", gray_spec) == "empty"
    assert _reason(b"name,price\nshoe,10\n", gray_spec) == "not_an_image"
    assert _reason(png[: len(png) // 2], gray_spec) == "truncated"  # cut in the pixel data
    assert _reason(png[:40], gray_spec) == "truncated"  # cut in the header
    jpeg = encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    assert _reason(jpeg[: len(jpeg) // 2], gray_spec) == "truncated"
    broken_stream = png[:50] + bytes([png[50] ^ 0xFF]) + png[51:]  # inside the IDAT deflate stream
    assert _reason(broken_stream, gray_spec) == "corrupt"
    garbage_header = png[:8] + bytes(30) + png[-12:]  # PNG signature and IEND around garbage
    assert _reason(garbage_header, gray_spec) == "corrupt"


def test_too_large_is_refused_from_the_header(gray_spec):
    # 8000 x 8000 = 64e6 pixels > the default 5e7, in a 100-byte file: refused before any decoding (decoding
    # would fail differently: the pixel data is missing).
    assert _reason(_png_claiming(8000, 8000), gray_spec) == "too_large"
    # Past PIL's own decompression-bomb limit (2 * Image.MAX_IMAGE_PIXELS) even with a lax max_pixels.
    assert _reason(_png_claiming(20000, 20000), gray_spec, max_pixels=10**12) == "too_large"


def test_max_pixels_is_inclusive(encode, gray_spec):
    data = encode(np.zeros((28, 28), np.uint8))
    assert decode_image(data, gray_spec, max_pixels=28 * 28).pixels.shape == (28, 28, 1)
    assert _reason(data, gray_spec, max_pixels=28 * 28 - 1) == "too_large"


def test_decode_error_reasons_are_closed():
    assert set(REASONS) == {"empty", "truncated", "corrupt", "not_an_image", "too_large", "unsupported"}
    with pytest.raises(ValueError):
        DecodeError("sad")


def test_bad_input_spec(encode):
    with pytest.raises(ValueError, match="channels"):
        decode_image(encode(np.zeros((4, 4), np.uint8)), {"height": 4, "width": 4, "channels": 2})


# -------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt, kwargs", [
    ("PNG", {}), ("JPEG", {"quality": 100}), ("WEBP", {"lossless": True}), ("BMP", {}), ("GIF", {}),
    ("TIFF", {"compression": "tiff_lzw"}), ("PPM", {}),
])
def test_every_accepted_format_decodes_to_the_same_pixels(encode, fmt, kwargs):
    pixels = np.zeros((4, 6), np.uint8)
    pixels[:, 3:] = 200
    got = _decode_l(encode(pixels, fmt, **kwargs))
    tolerance = 3 if fmt == "JPEG" else 0
    assert np.abs(got.astype(int) - pixels).max() <= tolerance, (fmt, got)


def test_multipage_tiff_and_animated_webp_use_the_first_frame(encode):
    frames = [_filled("L", 30), _filled("L", 220)]
    tiff = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    np.testing.assert_array_equal(_decode_l(tiff), np.full((4, 6), 30))
    webp = encode(frames[0].convert("RGB"), "WEBP", save_all=True, append_images=[frames[1].convert("RGB")],
                  lossless=True, duration=50)
    assert abs(int(_decode_l(webp)[0, 0]) - 30) <= 1


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX"])
def test_formats_outside_the_accepted_list_are_unsupported(encode, fmt):
    data = encode(_filled("RGB", (10, 20, 30), size=(16, 16)), fmt)
    with pytest.raises(DecodeError) as err:
        decode_image(data, GRAY_4x6)
    assert err.value.reason == "unsupported"
    assert str(err.value).startswith(f"unsupported: {fmt} images are not accepted")


def test_mpo_camera_jpeg_decodes_its_first_picture(encode):
    data = encode(_filled("RGB", (90, 90, 90)), "MPO", save_all=True, append_images=[_filled("RGB", (250, 250, 250))])
    assert Image.open(__import__("io").BytesIO(data)).format == "MPO"
    assert np.abs(_decode_l(data).astype(int) - 90).max() <= 2


def _textured(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(40, 220, (h, w, 3), dtype=np.uint8)


def test_border_box_cuts_bars_frames_and_caption_bars_but_not_a_photo():
    from siamese_core.decode import border_box, trim_borders
    photo = _textured(120, 160)
    assert border_box(photo) == (0, 120, 0, 160)
    letterbox = np.zeros((120, 260, 3), np.uint8)
    letterbox[:, 50:210] = photo
    top, bottom, left, right = border_box(letterbox)  # found on a copy at most TRIM_WORK_SIDE wide: +-3 px here
    assert (top, bottom) == (0, 120) and 50 <= left <= 53 and 207 <= right <= 210
    framed = np.full((140, 180, 3), 255, np.uint8)
    framed[10:130, 10:170] = photo
    assert abs(trim_borders(framed).shape[0] - 120) <= 4 and abs(trim_borders(framed).shape[1] - 160) <= 4
    caption = np.full((150, 160, 3), 20, np.uint8)
    caption[30:] = photo
    text = np.random.default_rng(2).random((14, 110)) < 0.45  # a line of text: a third of those rows is not bar
    caption[8:22, 10:120][text] = 255
    top, bottom, left, right = border_box(caption)
    assert 28 <= top <= 32 and (bottom, left, right) == (150, 0, 160)
    bold = np.full((150, 160, 3), 20, np.uint8)
    bold[30:] = photo
    bold[8:22, 5:155][np.random.default_rng(5).random((14, 150)) < 0.6] = 255  # lines 0.44 bar: large bold words
    assert 28 <= border_box(bold)[0] <= 32
    tiny = np.zeros((100, 100, 3), np.uint8)
    tiny[40:60, 40:60] = _textured(20, 20)  # cutting to it would keep under TRIM_MIN_KEPT: nothing is cut
    assert border_box(tiny) == (0, 100, 0, 100)


def _sky_over_ground(h=160, w=160, seed=3):
    """A photo whose top third is sky: a smooth gradient with a little noise, no edge anywhere in it."""
    rng = np.random.default_rng(seed)
    photo = _textured(h, w, seed)
    rows = h // 3
    ramp = np.linspace(235, 150, rows)[:, None, None] * np.array([0.75, 0.85, 1.0])
    photo[:rows] = np.clip(ramp + rng.normal(0, 2, (rows, w, 3)), 0, 255).astype(np.uint8)
    return photo


def test_border_box_leaves_a_band_of_the_photo_that_fades_out_and_cuts_a_bar_above_it():
    """Sky, haze or dark space at a photo's edge is plain too, but it fades into the picture: no edge ends it,
    so it is the photo, not a border. A caption bar above that sky ends at an edge: the bar alone is cut."""
    from siamese_core.decode import border_box
    sky = _sky_over_ground()
    assert border_box(sky) == (0, 160, 0, 160)
    captioned = np.full((190, 160, 3), 255, np.uint8)
    captioned[30:] = sky
    captioned[8:22, 10:120][np.random.default_rng(4).random((14, 110)) < 0.4] = 0
    top, bottom, left, right = border_box(captioned)
    assert 28 <= top <= 32 and (bottom, left, right) == (190, 0, 160)


def test_a_jpeg_caption_bar_is_trimmed_as_at_full_resolution(encode):
    """A JPEG decoded at 1/4 scale for a 64 px input would average the caption's text strokes into its bar, so
    the bar would end at the first text line and stay; with trimming on, decode keeps the detail to trim it."""
    from siamese_core.decode import decode_image
    photo = np.repeat(np.repeat(_textured(64, 64, 6), 4, axis=0), 4, axis=1)  # 256 x 256, 4 px blocks
    captioned = np.concatenate([np.full((48, 256, 3), 20, np.uint8), photo])
    strokes = np.random.default_rng(7).random((10, 80)) < 0.45
    captioned[10:40, 8:248][np.repeat(np.repeat(strokes, 3, axis=0), 3, axis=1)] = 255  # 3 px strokes
    spec = {"height": 64, "width": 64, "channels": 3, "dtype": "uint8", "value_range": [0, 255],
            "trim_borders": True}
    copy = decode_image(encode(captioned, "JPEG", quality=95), spec).pixels.astype(int)
    original = decode_image(encode(photo, "JPEG", quality=95), spec).pixels.astype(int)
    assert np.abs(copy - original).mean() < 4


def test_decode_trims_only_when_the_spec_says_so(encode):
    from siamese_core.decode import decode_image
    letterbox = np.zeros((64, 128, 3), np.uint8)
    letterbox[:, 32:96] = _textured(64, 64, 1)
    spec = {"height": 16, "width": 16, "channels": 3, "dtype": "uint8", "value_range": [0, 255]}
    plain = decode_image(encode(letterbox), spec).pixels
    trimmed = decode_image(encode(letterbox), {**spec, "trim_borders": True}).pixels
    direct = decode_image(encode(letterbox[:, 32:96]), spec).pixels
    assert plain[:, 0].max() == 0 and trimmed[:, 0].max() > 0
    assert np.abs(trimmed.astype(int) - direct).mean() < 2
