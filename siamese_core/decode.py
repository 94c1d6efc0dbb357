"""Decode image bytes into the encoder's input pixels. Pure functions: no Beam, no TensorFlow.

`decode_image` turns the bytes of an image file (JPEG, PNG, WebP, BMP, GIF, TIFF, PPM/PGM/PBM; see
ACCEPTED_FORMATS) into a uint8 array of the size and channel count the model card's `input_spec` asks
for, so that every image of a catalogue reaches the encoder the same way, or raises `DecodeError` with a
short reason that the pipeline writes to the failures table.

Steps, in order: refuse empty input; read the header only (PIL is lazy) and refuse images whose declared
width x height exceeds `max_pixels` before any pixel is decoded (decompression bombs); decode the first
frame (animated GIF/WebP/APNG: frame 0), letting JPEG decode at a reduced DCT scale when the target is
much smaller; apply the EXIF orientation; convert the mode (alpha is composited on white; 16-bit samples
are scaled, not clipped); with the spec's "trim_borders", cut away plain bands at the edges (letterbox bars, frames, caption
bars, window chrome: `border_box`); resize to the spec's size (stretching: the whole picture is kept,
aspect ratio is not); return (H, W, C) uint8.

PIL's own process-wide decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, errors above twice it) is left
as it is: `max_pixels` is the policy, and an image over PIL's limit is reported as 'too_large' as well.
`ImageFile.LOAD_TRUNCATED_IMAGES` must stay False: a truncated file is a failure, not a grey band.
"""
from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The largest declared width x height decoded (embed's --max_pixels default; the report's thumbnails).
DEFAULT_MAX_PIXELS = 50_000_000
# Reasons written to the failures table (stage "decode"), after "DecodeError: ".
EMPTY = "empty"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
NOT_AN_IMAGE = "not_an_image"
TOO_LARGE = "too_large"
UNSUPPORTED = "unsupported"
REASONS = (EMPTY, TRUNCATED, CORRUPT, NOT_AN_IMAGE, TOO_LARGE, UNSUPPORTED)

# The formats decoded (PIL plugin names). Others PIL knows (EPS, which runs Ghostscript; PSD; ICO; ...) are
# refused as 'unsupported' before any of their decoders runs: fewer decoders, fewer ways for a file to
# hurt a worker. Camera JPEGs that PIL names MPO open through the JPEG plugin; DIB is BMP without its file
# header.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM")

# Leading bytes of formats PIL reads: bytes that start like an image but do not parse are "corrupt",
# not "not_an_image".
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF",
)

# Formats whose files end with a fixed marker: missing means the file was cut short.
_END_MARKERS = ((b"\x89PNG\r\n\x1a\n", b"IEND"), (b"\xff\xd8\xff", b"\xff\xd9"), (b"GIF8", b";"))


def _lacks_end_marker(data: bytes) -> bool:
    """True if `data` starts like a PNG, JPEG or GIF but lacks that format's end marker near its end."""
    tail = data[-16:].rstrip(b"\x00")
    return any(data.startswith(sig) and end not in tail for sig, end in _END_MARKERS)


# 16-bit grayscale modes; "I" (32-bit int) is what some 16-bit TIFF/PNG files decode to.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class DecodeError(ValueError):
    """An image that cannot be decoded. `reason` is one of REASONS; `detail` says what was found."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown decode failure reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """Pixels ready for the encoder plus the original size.

    pixels: uint8 array (height, width, channels) of the input spec.
    width, height: the source image's size in pixels as displayed (after EXIF orientation), before
    resizing.
    """

    pixels: np.ndarray
    width: int
    height: int


def spec_shape(input_spec: dict) -> tuple[int, int, int]:
    """(height, width, channels) of a model card's input spec; ValueError if it is not a valid one."""
    height, width, channels = int(input_spec["height"]), int(input_spec["width"]), int(input_spec["channels"])
    if channels not in (1, 3) or height < 1 or width < 1:
        raise ValueError(f"input_spec must give height, width >= 1 and channels 1 or 3, got {input_spec}")
    return height, width, channels


def _other_format(data: bytes) -> str | None:
    """The name of a format PIL knows but we do not accept, if `data`'s header parses as one."""
    try:
        with Image.open(io.BytesIO(data)) as image:  # header only: no plugin decodes pixels here
            return image.format
    except Exception:
        return None


def _open_header(data: bytes, max_pixels: int) -> Image.Image:
    """Open `data` reading only the header; refuse images over `max_pixels` before any pixel decoding."""
    if not data:
        raise DecodeError(EMPTY, "zero bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as err:
        raise DecodeError(TOO_LARGE, str(err)) from None
    except UnidentifiedImageError:
        other = None if data.startswith(_SIGNATURES) else _other_format(data)
        if other is not None:
            raise DecodeError(UNSUPPORTED, f"{other} images are not accepted (accepted: "
                                           f"{', '.join(ACCEPTED_FORMATS)})") from None
        if data.startswith(_SIGNATURES):
            if _lacks_end_marker(data):
                raise DecodeError(TRUNCATED, f"{len(data)} bytes: the header is cut short") from None
            raise DecodeError(CORRUPT, f"starts like an image ({data[:8]!r}) but its header does not parse") from None
        raise DecodeError(NOT_AN_IMAGE, f"{len(data)} bytes in no image format PIL knows") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DecodeError(CORRUPT, f"header: {type(err).__name__}: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            TOO_LARGE, f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
        )
    if width < 1 or height < 1:
        raise DecodeError(CORRUPT, f"declared size {width}x{height}")
    return image


def _load_first_frame(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Decode frame 0 of `image`; JPEG may decode at 1/2, 1/4 or 1/8 scale, never below `target`."""
    if image.format == "JPEG":
        side = max(target)
        image.draft(None, (side, side))
    try:
        image.seek(0)
        image.load()
    except Image.DecompressionBombError as err:
        raise DecodeError(TOO_LARGE, str(err)) from None
    except MemoryError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors, ...
        message = f"{type(err).__name__}: {err}"
        if "truncated" in str(err).lower() or isinstance(err, EOFError):
            raise DecodeError(TRUNCATED, message) from None
        raise DecodeError(CORRUPT, message) from None
    return image


def _orient(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; an unreadable EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block is metadata damage, not a broken picture
        return image


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit int) grayscale to 8 bits by scaling 0..65535 onto 0..255 (PIL would clip)."""
    samples = np.asarray(image).astype(np.int64)
    scaled = (np.clip(samples, 0, 65535) * 255 + 32767) // 65535
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _composite_on_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to 'L' (channels 1) or 'RGB' (channels 3).

    Transparent pixels (alpha modes, or a palette/tRNS transparency) are composited on white first, so a
    logo on a transparent background looks like the same logo on a white page. CMYK, YCbCr, P, 1 and F
    go through PIL's conversions; 16-bit samples are rescaled to 8 bits.
    """
    mode = image.mode
    target = "L" if channels == 1 else "RGB"
    try:
        if mode in _SIXTEEN_BIT_MODES:
            image = _sixteen_bit_to_l(image)
        elif mode in _ALPHA_MODES or "transparency" in image.info:
            image = _composite_on_white(image)
        if image.mode == target:
            return image
        try:
            return image.convert(target)
        except ValueError:  # some modes (LAB) convert to RGB only
            return image.convert("RGB").convert(target)
    except (ValueError, OSError) as err:
        raise DecodeError(UNSUPPORTED, f"mode {mode}: {err}") from None


# Border trimming (input_spec "trim_borders": true): letterbox bars, frames, caption bars and window chrome
# are cut away before the resize, so a padded or framed copy reaches the encoder like its original.
TRIM_TOLERANCE = 12      # a pixel belongs to the edge's colour within this many grey levels (max over channels)
TRIM_SHARE = 0.75        # a line (row or column) is border when at least this share of it has the edge colour
TRIM_TEXT_SHARE = 0.3    # a band runs on through lines with this share (text on a caption bar: large bold
                         # words leave 0.34 of a line to the bar in the demo catalogue)
TRIM_MAX_SIDE = 0.35     # at most this share of the height (width) is cut from one side
TRIM_MIN_KEPT = 0.4      # and at least this share of each dimension is kept, else nothing is cut
TRIM_ROUNDS = 3          # a title bar above a margin: each round strips one band of one colour per side
TRIM_WORK_SIDE = 96      # the box is found on a copy at most this large
# A band is cut only where it ends at an edge: within TRIM_EDGE_LINES lines after it, a line of which at
# least TRIM_EDGE_SHARE lies farther than 2 x TRIM_TOLERANCE from the band's colour (two lines: a resized
# copy blends the boundary line). A band that fades out instead (sky, haze, dark space, a plain wall) is
# the photo itself: before this rule, trimming cut into 130 of the demo catalogue's 272 originals.
TRIM_EDGE_LINES = 2
TRIM_EDGE_SHARE = 0.5
# With trimming on, a JPEG is decoded at a reduced scale only down to this side (short side, px). A 1/4 or
# 1/8 scale decode averages a caption's text strokes into its bar, and the band then ends at the first text
# row: 2 of 13 caption copies of the demo catalogue were trimmed right at the input's 64 px, 11 at full
# resolution, where the trainer trims its edited copies (trainer.copy_edits.to_input).
TRIM_DECODE_SIDE = 512

# Bumped whenever the same file and input spec decode to other pixels (2: trimming decodes JPEGs at up to
# TRIM_DECODE_SIDE). The model_id covers the weights and the input spec, not this code: a store of templates
# kept across runs (nightly's state) records the version and re-embeds when it changes.
DECODE_VERSION = 2


def _edge_run(lines: np.ndarray, limit: int) -> int:
    """How many lines, from index 0 on, are border: lines (n, m, c) int16, line 0 at the edge.

    The band starts with a plain line (TRIM_SHARE of it in the edge's colour) and runs on through lines that
    are at least TRIM_TEXT_SHARE that colour (a caption's text rows); it ends at its last plain line, and
    counts only if an edge follows it (TRIM_EDGE_*): 0 otherwise."""
    if limit <= 0:
        return 0
    edge = np.median(lines[0], axis=0)
    share = (np.abs(lines[:limit + 1] - edge).max(axis=2) <= TRIM_TOLERANCE).mean(axis=1)
    if not len(share) or share[0] < TRIM_SHARE:
        return 0
    inside = share >= TRIM_TEXT_SHARE
    end = int(np.argmin(inside)) if not inside.all() else len(inside)
    plain = np.flatnonzero(share[:end] >= TRIM_SHARE)
    run = min(int(plain[-1]) + 1, limit)
    after = lines[run:run + TRIM_EDGE_LINES]
    far = (np.abs(after - edge).max(axis=2) > 2 * TRIM_TOLERANCE).mean(axis=1) if len(after) else np.zeros(1)
    return run if far.max() >= TRIM_EDGE_SHARE else 0


def border_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) row/column bounds of `pixels` (H, W[, C] uint8) without the plain bands at
    its edges (see TRIM_*); the whole image when trimming would keep too little or finds nothing."""
    a = np.asarray(pixels)
    a = a[..., None] if a.ndim == 2 else a
    h, w = a.shape[:2]
    step = max(1, int(np.ceil(max(h, w) / TRIM_WORK_SIDE)))
    small = a[::step, ::step].astype(np.int16)
    sh, sw = small.shape[:2]
    top, bottom, left, right = 0, sh, 0, sw
    max_rows, max_cols = int(sh * TRIM_MAX_SIDE), int(sw * TRIM_MAX_SIDE)  # per side, over all rounds
    for _ in range(TRIM_ROUNDS):
        box = small[top:bottom, left:right]
        if box.shape[0] < 4 or box.shape[1] < 4:
            break
        cols = box.transpose(1, 0, 2)
        cuts = (_edge_run(box, max_rows - top), _edge_run(box[::-1], max_rows - (sh - bottom)),
                _edge_run(cols, max_cols - left), _edge_run(cols[::-1], max_cols - (sw - right)))
        if not any(cuts):
            break
        top, bottom, left, right = top + cuts[0], bottom - cuts[1], left + cuts[2], right - cuts[3]
    box = (top * step, min(h, bottom * step), left * step, min(w, right * step))
    if box[1] - box[0] < TRIM_MIN_KEPT * h or box[3] - box[2] < TRIM_MIN_KEPT * w:
        return 0, h, 0, w
    return box


def trim_borders(pixels: np.ndarray) -> np.ndarray:
    """`pixels` (H, W[, C]) without the plain bands at its edges (border_box)."""
    top, bottom, left, right = border_box(pixels)
    return pixels[top:bottom, left:right]


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft: tuple[int, int] = (1, 1)) -> Image.Image:
    """The first frame of image file `data`, decoded and turned by its EXIF orientation, under the same
    allow-list (ACCEPTED_FORMATS) and decompression-bomb limit (`max_pixels`) as `decode_image`: for
    every other place that opens a catalogue's images (the report's thumbnails). `draft`: the smallest
    (width, height) wanted (JPEG may decode at a reduced scale above it). Raises DecodeError."""
    image = _open_header(bytes(data), int(max_pixels))
    image = _load_first_frame(image, draft)
    if image.width * image.height > max_pixels:
        raise DecodeError(TOO_LARGE, f"decoded frame {image.width}x{image.height} exceeds max_pixels={max_pixels}")
    return _orient(image)


def decode_image(data: bytes, input_spec: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode image file bytes into the encoder's input pixels.

    data: the whole file. input_spec: the model card's input spec ({"height", "width", "channels", ...}).
    max_pixels: largest declared width*height accepted; checked on the header, before decoding.
    Returns DecodedImage(pixels uint8 (height, width, channels), original width, original height).
    Raises DecodeError(reason) with reason in REASONS: 'empty', 'not_an_image', 'truncated', 'corrupt',
    'too_large', 'unsupported' (a format outside ACCEPTED_FORMATS, or a mode that cannot become L/RGB).
    """
    height, width, channels = spec_shape(input_spec)
    image = _open_header(bytes(data), int(max_pixels))
    header_size = image.size
    try:
        trim = bool(input_spec.get("trim_borders"))
        image = _load_first_frame(image, (max(width, TRIM_DECODE_SIDE), max(height, TRIM_DECODE_SIDE)) if trim
                                  else (width, height))
        if image.width * image.height > max_pixels:  # a frame larger than the header said
            raise DecodeError(TOO_LARGE, f"decoded frame {image.width}x{image.height} exceeds max_pixels={max_pixels}")
        stored_size = image.size  # smaller than header_size when JPEG decoded at a reduced scale
        image = _orient(image)
        # Report the file's own size, turned like the pixels when the orientation swapped the axes.
        turned = image.size != stored_size
        source_width, source_height = header_size[::-1] if turned else header_size
        image = to_channels(image, channels)
        if trim:
            top, bottom, left, right = border_box(np.asarray(image))
            if (top, left) != (0, 0) or (bottom, right) != (image.height, image.width):
                image = image.crop((left, top, right, bottom))
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.uint8)
    finally:
        image.close()
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    return DecodedImage(np.ascontiguousarray(pixels), int(source_width), int(source_height))

