"""Copy edits: what happens to a photo between its first upload and its duplicate. ONE definition, used to
train photo copy-detection encoders (`augmenter`), to plant copies in the demo's photo catalogue
(`plant_copy`, one recorded family per copy) and to make the synthetic copies match-time self-calibration
embeds (`plant_copy` again, on sampled catalogue items).

The pixel work is done by albumentations (crops, JPEG, colour, blur, sharpen, rotation, grey, mirror,
resizing); the edits it has no transform for (letterbox padding, a border, a caption bar, a text watermark,
a screenshot) are small albumentations transforms here, drawing with OpenCV and PIL and taking their random
choices from albumentations' seeded `py_random`, so a seed gives the same copies everywhere.

Families (EDIT_FAMILIES), as planted (strengths in `_FAMILY_TRANSFORMS`):
  resize        re-uploaded smaller: 30-70 % of the side
  jpeg          re-compressed at quality 30-90
  crop          cropped to 70-90 % of each side, anywhere
  pad           letterboxed to 16:9, 9:16 or 4:3 with black, white or grey bars
  border        a plain frame, 3-8 % of the side
  caption       a caption bar with text above or below (the canvas grows)
  overlay_text  a watermark or text overlay, opaque or translucent
  grey          turned grey (3 equal channels)
  colour        hue, saturation, brightness and contrast shifted
  blur          Gaussian blur, sigma 1-2.5 px at 256 px
  sharpen       unsharp-mask sharpening
  rotate        rotated 3-10 degrees, corners filled or cropped away
  mirror        flipped left-right (MIRROR: optional, some catalogues count a mirror as another item)
  screenshot    shown in an application window, captured and scaled
Every planted copy is then saved as an upload would be (JPEG, quality 75-95), except `jpeg`, which is its
own quality. Training (`augmenter`) composes several families at once, with wider ranges, then resizes to
the encoder's input like siamese_core.decode does (stretching, bilinear).
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIRROR = "mirror"
EDIT_FAMILIES = ("resize", "jpeg", "crop", "pad", "border", "caption", "overlay_text", "grey", "colour", "blur",
                 "sharpen", "rotate", MIRROR, "screenshot")
UPLOAD_JPEG_QUALITY = (75, 95)

_WORDS = ("SALE", "sample", "© 2024", "@photo_daily", "NEW", "preview", "shared via app", "holiday 2019",
          "DO NOT COPY", "stock photo", "#travel", "best price", "view more", "Reposted")
_FILLS = ((0, 0, 0), (255, 255, 255), (128, 128, 128), (32, 32, 32), (240, 236, 228))


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(6, int(size)))


def _draw_text(img: np.ndarray, text: str, xy: tuple[int, int], size: int, colour: tuple, alpha: float):
    """Render `text` onto uint8 RGB `img` (H, W, 3) at `xy` with opacity `alpha`; returns a new array."""
    base = Image.fromarray(img)
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    ImageDraw.Draw(layer).text(xy, text, font=_font(size), fill=(*colour, int(255 * alpha)))
    return np.asarray(Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB"))


class Letterbox(A.ImageOnlyTransform):
    """Pad to another aspect ratio (16:9, 9:16, 4:3 or 3:4), the photo centred, bars of one plain colour."""

    def get_params(self):
        r = self.py_random
        return {"aspect": r.choice((16 / 9, 9 / 16, 4 / 3, 3 / 4)), "fill": r.choice(_FILLS)}

    def apply(self, img, aspect=16 / 9, fill=(0, 0, 0), **params):
        h, w = img.shape[:2]
        if w / h < aspect:  # too narrow: bars left and right
            extra_w, extra_h = int(round(h * aspect)) - w, 0
        else:
            extra_w, extra_h = 0, int(round(w / aspect)) - h
        return cv2.copyMakeBorder(img, extra_h // 2, extra_h - extra_h // 2, extra_w // 2, extra_w - extra_w // 2,
                                  cv2.BORDER_CONSTANT, value=fill)


class Border(A.ImageOnlyTransform):
    """A plain frame of `width_range` x the short side on every edge."""

    def __init__(self, width_range=(0.03, 0.08), p: float = 1.0):
        super().__init__(p=p)
        self.width_range = width_range

    def get_params(self):
        r = self.py_random
        return {"fraction": r.uniform(*self.width_range), "fill": r.choice(_FILLS + ((150, 20, 20),))}

    def apply(self, img, fraction=0.05, fill=(0, 0, 0), **params):
        b = max(1, int(round(min(img.shape[:2]) * fraction)))
        return cv2.copyMakeBorder(img, b, b, b, b, cv2.BORDER_CONSTANT, value=fill)


class CaptionBar(A.ImageOnlyTransform):
    """A bar of text above or below the photo (meme or news style): the canvas grows by `height_range`."""

    def __init__(self, height_range=(0.12, 0.22), p: float = 1.0):
        super().__init__(p=p)
        self.height_range = height_range

    def get_params(self):
        r = self.py_random
        return {"fraction": r.uniform(*self.height_range), "top": r.random() < 0.5,
                "text": " ".join(r.sample(_WORDS, 2)), "dark": r.random() < 0.5}

    def apply(self, img, fraction=0.15, top=False, text="caption", dark=True, **params):
        h, w = img.shape[:2]
        bar = max(4, int(round(h * fraction)))
        bg, fg = ((20, 20, 20), (255, 255, 255)) if dark else ((255, 255, 255), (0, 0, 0))
        out = cv2.copyMakeBorder(img, bar if top else 0, 0 if top else bar, 0, 0, cv2.BORDER_CONSTANT, value=bg)
        y = (0 if top else h) + bar // 5
        return _draw_text(out, text, (max(1, w // 20), y), int(bar * 0.6), fg, 1.0)


class TextOverlay(A.ImageOnlyTransform):
    """Text written over the photo: a translucent watermark or an opaque label, `size_range` x the height."""

    def __init__(self, size_range=(0.08, 0.16), p: float = 1.0):
        super().__init__(p=p)
        self.size_range = size_range

    def get_params(self):
        r = self.py_random
        return {"size": r.uniform(*self.size_range), "x": r.uniform(0.0, 0.5), "y": r.uniform(0.0, 0.85),
                "text": r.choice(_WORDS), "colour": r.choice(((255, 255, 255), (0, 0, 0), (255, 220, 0))),
                "alpha": r.choice((0.35, 0.6, 1.0))}

    def apply(self, img, size=0.1, x=0.1, y=0.1, text="sample", colour=(255, 255, 255), alpha=1.0, **params):
        h, w = img.shape[:2]
        return _draw_text(img, text, (int(x * w), int(y * h)), int(size * h), colour, alpha)


class Screenshot(A.ImageOnlyTransform):
    """The photo shown in an application window (title bar, margins, a status line), captured and scaled."""

    def get_params(self):
        r = self.py_random
        return {"margin": r.uniform(0.04, 0.15), "title": r.uniform(0.06, 0.12), "scale": r.uniform(0.5, 0.9),
                "light": r.random() < 0.5, "text": r.choice(_WORDS)}

    def apply(self, img, margin=0.1, title=0.08, scale=0.7, light=True, text="photo.jpg", **params):
        h, w = img.shape[:2]
        m, t = int(round(margin * w)), int(round(title * h))
        window = (236, 236, 236) if light else (45, 45, 48)
        out = cv2.copyMakeBorder(img, t + m, m, m, m, cv2.BORDER_CONSTANT, value=window)
        bar = (200, 200, 205) if light else (70, 70, 75)
        out[:t] = bar
        out = _draw_text(out, text, (m, t // 5), int(t * 0.6), (0, 0, 0) if light else (220, 220, 220), 1.0)
        size = (max(8, int(out.shape[1] * scale)), max(8, int(out.shape[0] * scale)))
        return cv2.resize(out, size, interpolation=cv2.INTER_AREA)


class ScaleSide(A.ImageOnlyTransform):
    """Resize by a factor drawn from `scale_range` (aspect kept): a thumbnail or an upscale."""

    def __init__(self, scale_range=(0.3, 0.7), p: float = 1.0):
        super().__init__(p=p)
        self.scale_range = scale_range

    def get_params(self):
        return {"scale": self.py_random.uniform(*self.scale_range)}

    def apply(self, img, scale=0.5, **params):
        h, w = img.shape[:2]
        size = (max(8, int(round(w * scale))), max(8, int(round(h * scale))))
        return cv2.resize(img, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _family_transform(family: str) -> A.BasicTransform:
    """The albumentations transform that plants one copy of `family` (realistic strength)."""
    table = {
        "resize": lambda: ScaleSide((0.3, 0.7)),
        "jpeg": lambda: A.ImageCompression(quality_range=(30, 90), p=1.0),
        "crop": lambda: A.RandomCropFromBorders(crop_left=0.15, crop_right=0.15, crop_top=0.15,
                                                crop_bottom=0.15, p=1.0),
        "pad": lambda: Letterbox(p=1.0),
        "border": lambda: Border((0.03, 0.08)),
        "caption": lambda: CaptionBar((0.12, 0.22)),
        "overlay_text": lambda: TextOverlay((0.08, 0.16)),
        "grey": lambda: A.ToGray(num_output_channels=3, p=1.0),
        "colour": lambda: A.Compose([A.HueSaturationValue(hue_shift_limit=15, sat_shift_limit=40, val_shift_limit=15,
                                                          p=1.0),
                                     A.RandomBrightnessContrast(0.15, 0.2, p=1.0)]),
        "blur": lambda: A.GaussianBlur(sigma_limit=(1.0, 2.5), p=1.0),
        "sharpen": lambda: A.Sharpen(alpha=(0.3, 0.7), lightness=(0.8, 1.0), p=1.0),
        "rotate": lambda: A.OneOf([A.Rotate(limit=(-10, 10), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),
                                   A.Rotate(limit=(-10, 10), crop_border=True, p=1.0)], p=1.0),
        MIRROR: lambda: A.HorizontalFlip(p=1.0),
        "screenshot": lambda: Screenshot(p=1.0),
    }
    if family not in table:
        raise ValueError(f"edit family must be one of {EDIT_FAMILIES}, got {family!r}")
    return table[family]()


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"copy edits take uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"copy edits take (H, W), (H, W, 1) or (H, W, 3) images, got shape {image.shape}")
    return np.ascontiguousarray(np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image)


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """uint8 RGB (H, W, 3) saved as a JPEG of `quality` and decoded again (what an upload does)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


class CopyPlanter:
    """Plants one copy of a named family (EDIT_FAMILIES). Build once, call per image: the transforms are
    made once and reseeded per call from the caller's numpy Generator."""

    def __init__(self, families: tuple[str, ...] = EDIT_FAMILIES):
        self.families = tuple(families)
        self._transforms = {f: A.Compose([_family_transform(f)], strict=False) for f in self.families}

    def __call__(self, image: np.ndarray, family: str, rng: np.random.Generator) -> np.ndarray:
        """uint8 (H, W[, C]) -> the edited copy, uint8 RGB (h, w, 3) (size may change), already through an
        upload's JPEG round trip (family `jpeg`: its own quality)."""
        if family not in self._transforms:
            raise ValueError(f"edit family must be one of {self.families}, got {family!r}")
        transform = self._transforms[family]
        transform.set_random_seed(_seed(rng))
        out = transform(image=_rgb(image))["image"]
        if family != "jpeg":
            out = jpeg_round_trip(out, int(rng.integers(UPLOAD_JPEG_QUALITY[0], UPLOAD_JPEG_QUALITY[1] + 1)))
        return out


_PLANTER: CopyPlanter | None = None


def plant_copy(image: np.ndarray, family: str, rng: np.random.Generator) -> np.ndarray:
    """One planted copy of `image` by the edit `family` (see CopyPlanter)."""
    global _PLANTER
    if _PLANTER is None:
        _PLANTER = CopyPlanter()
    return _PLANTER(image, family, rng)


def choose_families(n: int, rng: np.random.Generator, mirror: bool = True) -> list[str]:
    """`n` edit families, cycling through EDIT_FAMILIES (MIRROR only if `mirror`) in a shuffled order so
    every family is planted about equally often."""
    families = [f for f in EDIT_FAMILIES if mirror or f != MIRROR]
    out: list[str] = []
    while len(out) < n:
        out += list(rng.permutation(families))
    return out[:n]


def augmenter(size: int, *, mirror: bool = True) -> A.Compose:
    """Training edits: a random composition of the families above with wider ranges (the output's size
    varies; BatchAugmenter resizes it like decode). Call as `augmenter(...)(image=x)["image"]`; seed it with
    `.set_random_seed(s)`."""
    geometric = A.OneOf([
        A.RandomResizedCrop(size=(size * 2, size * 2), scale=(0.35, 1.0), ratio=(0.6, 1.6), p=1.0),
        Letterbox(p=0.35),
        Border((0.02, 0.12), p=0.35),
        A.Rotate(limit=(-12, 12), border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.2),
        A.Rotate(limit=(-12, 12), crop_border=True, p=0.2),
        Screenshot(p=0.2),
    ], p=0.75)
    overlays = A.OneOf([CaptionBar((0.08, 0.28), p=1.0), TextOverlay((0.06, 0.22), p=1.0)], p=0.35)
    colour = A.OneOf([
        A.ToGray(num_output_channels=3, p=0.6),
        A.HueSaturationValue(hue_shift_limit=25, sat_shift_limit=60, val_shift_limit=25, p=1.0),
        A.RandomBrightnessContrast(0.3, 0.3, p=1.0),
        A.ColorJitter(brightness=(0.7, 1.3), contrast=(0.7, 1.3), saturation=(0.5, 1.5), hue=(-0.08, 0.08), p=1.0),
    ], p=0.6)
    detail = A.OneOf([
        A.GaussianBlur(sigma_limit=(0.5, 3.0), p=1.0),
        A.Sharpen(alpha=(0.2, 0.8), lightness=(0.7, 1.0), p=1.0),
        A.Downscale(scale_range=(0.3, 0.7), p=1.0),
    ], p=0.35)
    steps = [geometric, overlays, colour, detail]
    if mirror:
        steps.append(A.HorizontalFlip(p=0.5))
    steps.append(A.ImageCompression(quality_range=(25, 95), p=0.6))
    return A.Compose(steps, strict=False)


class BatchAugmenter:
    """Edits batches for training: uint8 (n, S, S, 3) sources -> uint8 (n, size, size, 3) copies, seeded
    from the caller's Generator (one albumentations seed per batch), so a run is reproducible. Each copy
    reaches the input size as decode takes a file there: plain edge bands cut when `trim` (the input spec's
    trim_borders), then resized."""

    def __init__(self, size: int, *, mirror: bool = True, trim: bool = False):
        self.size, self.trim = size, trim
        self._compose = augmenter(size, mirror=mirror)

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        self._compose.set_random_seed(_seed(rng))
        out = np.empty((len(images), self.size, self.size, 3), np.uint8)
        for k, image in enumerate(images):
            out[k] = to_input(self._compose(image=_rgb(image))["image"], self.size, self.trim)
        return out


class PlantedBatch:
    """Evaluation copies: one planted family per image (cycling through the families, like the demo's
    catalogue), resized to `size` x `size` like decode: (sources uint8 (n, S, S, 3), rng) -> (n, size, size, 3)."""

    def __init__(self, size: int, *, mirror: bool = True, trim: bool = False):
        self.size, self.mirror, self.trim = size, mirror, trim
        self._planter = CopyPlanter()

    def __call__(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        families = choose_families(len(images), rng, mirror=self.mirror)
        out = np.empty((len(images), self.size, self.size, 3), np.uint8)
        for k, (image, family) in enumerate(zip(images, families)):
            out[k] = to_input(self._planter(image, family, rng), self.size, self.trim)
        return out


def to_input(image: np.ndarray, size: int, trim: bool = False) -> np.ndarray:
    """One edited copy uint8 (h, w, 3) -> the encoder's input (size, size, 3) as decode makes it from a file:
    plain edge bands cut (siamese_core.decode.trim_borders) when `trim`, then PIL's bilinear resize."""
    if trim:
        from siamese_core.decode import trim_borders
        image = trim_borders(image)
    return resize_like_decode(np.ascontiguousarray(image)[None], size)[0]


def resize_like_decode(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, H, W, 3) -> (n, size, size, 3) with PIL's bilinear resize, as siamese_core.decode does."""
    out = np.empty((len(images), size, size, images.shape[-1]), np.uint8)
    for k, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        res = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
        out[k] = res[..., None] if res.ndim == 2 else res
    return out


__all__ = ["EDIT_FAMILIES", "MIRROR", "CopyPlanter", "plant_copy", "choose_families", "augmenter",
           "BatchAugmenter", "PlantedBatch", "to_input", "jpeg_round_trip", "resize_like_decode"]
