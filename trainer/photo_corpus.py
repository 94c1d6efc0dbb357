"""A corpus of distinct natural-photo tiles from Debian image packages and scikit-image's bundled samples.

Nothing is downloaded: the photographs come from apt packages (`scripts/setup_env.sh` installs them) and
from the sample images inside the scikit-image wheel. The corpus serves two purposes: training a
copy-detection encoder, and building a demo catalogue of originals with planted edited copies. Both need
items that are *not* copies of each other, so:

- each photo is cut into square tiles at several scales (default 1/2, 1/4 and 1/8 of its short side);
  the photo is split into disjoint square *blocks* and each block is given one scale, so tiles of one
  scale never overlap and tiles of different scales never share a pixel (a large tile containing a
  smaller one would be a crop duplicate);
- the same artwork shipped at several resolutions or aspect ratios is kept once (the largest file);
- flat tiles (sky, plain walls, smooth gradients) are dropped, and so is any tile that is a near-duplicate
  of an earlier one by a 16x16 grey thumbnail distance (z-scored, so brightness/contrast changes do not
  hide a copy).

Every tile carries its provenance (source, file, scale, box in the photo's pixels), so any item can be
traced. Sources are split by package (`DEFAULT_SPLIT`, `build_split`): a model trained on some packages
can be tested on a catalogue built from packages it never saw.

The wallpaper packages of Plasma/KDE, GNOME, MATE and UKUI are held out for other tests and must never
enter this corpus: `deny_reason` rejects their paths and every file owned by such a package, and every
file is checked again when it is decoded.

numpy in, numpy out: tiles are uint8 arrays of shape (n, S, S, 3), RGB, values 0-255.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import functools
import glob
import importlib.util
import logging
import os
import re
import zlib
from typing import Iterable, NamedTuple, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# One place that lists the sources. Each entry: `apt` the Debian packages that ship it (the error for a
# missing source names them; scripts/setup_env.sh installs the same list, a test checks it), `globs` where
# the photographs lie, `exclude` globs to leave out, `owned` (default True) keep only files that dpkg lists
# as owned by one of `apt` (lomiri 16.04 and 20.04 both install into /usr/share/backgrounds, as other
# packages may), `rows` (top, bottom) fractions of the height that tiles of a 2:1 picture (an
# equirectangular map) may come from. `pip`/`samples` name scikit-image's bundled sample photos instead.
#
# Looked at and left out: sway-backgrounds (one flat logo wallpaper at 8 sizes: 3 tiles), desktop-base
# (smooth rendered themes: no tile that is not flat), debian-edu-artwork-* (the same themes with the
# Debian Edu logo: 11 tiles, mostly logo and text), xplanet-images (its earth.jpg is OpenUniverse's map
# in other colours: tile for tile an edited copy), stellarium-data (246 MB), lxqt-themes (some wallpapers
# are KDE/Plasma artwork).
PACKAGES: dict[str, dict] = {
    "lomiri-16.04": {  # 15 photographs, 1365x1074 to 5312x2988
        "apt": ("lomiri-wallpapers-16.04",),
        "globs": ("/usr/share/backgrounds/*.jpg", "/usr/share/backgrounds/*.png"),
    },
    "lomiri-20.04": {  # 4 large images: two photographs, two renders (one of them flat colour, dropped)
        "apt": ("lomiri-wallpapers-20.04",),
        "globs": ("/usr/share/backgrounds/*.jpg", "/usr/share/backgrounds/*.png"),
    },
    "endless-sky": {  # the game's 273 landing-scene photographs (720x360; public domain and CC-BY-SA)
        "apt": ("endless-sky-data",),
        "globs": ("/usr/share/games/endless-sky/images/land/*.jpg",),
    },
    "planets": {  # planetarium textures (OpenUniverse): planet and moon maps, small moons, two galaxies
        "apt": ("openuniverse-common",),
        "globs": ("/usr/share/openuniverse/textures/*.jpg",),
        # spacecraft textures and splash screens are not photographs
        "exclude": ("*/splash*", "*/sun.jpg", "*/apl-*", "*/wingtop*", "*/station*", "*/cockpit*", "*/panels*",
                    "*/body_*", "*/eng*", "*/heatshld*", "*/hole*", "*/flare*", "*/bottom*"),
        "rows": (0.2, 0.8),  # equirectangular maps: leave out the stretched polar rows
    },
    "skimage": {  # photographs inside the scikit-image wheel (skimage/data), no download
        "pip": "scikit-image",
        "samples": ("astronaut", "brick", "camera", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
                    "hubble_deep_field", "ihc", "moon", "motorcycle_left", "retina", "rocket"),
    },
}

# Train on these, test on a catalogue made from the others (disjoint packages). The held-out side is the
# 273 Endless Sky photographs (about 1,760 distinct tiles at S=256: enough for a demo catalogue of
# 600-1,500 originals); the training side has the large lomiri photographs, the planet maps and
# scikit-image's samples (about 550 tiles at S=256; about 970 with scales=(2, 4, 8, 16)).
DEFAULT_SPLIT: dict[str, tuple[str, ...]] = {
    "train": ("lomiri-16.04", "lomiri-20.04", "planets", "skimage"),
    "heldout": ("endless-sky",),
}

# --- deny-list: held-out tests use these desktops' wallpapers -------------------------------------
DENY_NAMES = ("plasma", "kde", "gnome", "mate", "ukui")
# A path is denied when one of its name tokens (split at anything not a letter or digit) is a DENY_NAMES
# word, or when it contains one of DENY_SUBSTRINGS anywhere ("mate" only as a token: "ultimate").
DENY_SUBSTRINGS = ("plasma", "gnome", "ukui")
# Wallpaper directories of those desktops: KDE installs into /usr/share/wallpapers, none of our sources do.
DENY_DIRS = ("/usr/share/wallpapers",)
# Any file owned by a Debian package whose name matches this is denied (read from dpkg's file lists).
DENY_PACKAGE_RE = re.compile(r"plasma|gnome|ukui|(?:^|[-.])(?:kde|mate)(?:[-.]|$)")
DPKG_INFO_DIR = "/var/lib/dpkg/info"

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class PhotoFile(NamedTuple):
    """One photograph: the source name (a PACKAGES key) and its absolute path."""
    source: str
    path: str


@dataclasses.dataclass(frozen=True)
class TileOrigin:
    """Where a tile came from. `box` = (left, top, right, bottom) in the photo's full-resolution pixels
    (right/bottom exclusive); `scale` k: the tile side is 1/k of the photo's short side; `block` the
    index of the disjoint block (one scale per block) the tile lies in; `width`/`height` the photo's."""
    source: str
    file: str
    scale: int
    box: tuple[int, int, int, int]
    block: int
    width: int
    height: int


# ------------------------------------------------------------------------------------------------
# deny-list


@functools.lru_cache(maxsize=4)
def _denied_owned_files(info_dir: str) -> frozenset[str]:
    """Paths owned by any installed package whose name matches DENY_PACKAGE_RE (dpkg's *.list files)."""
    out: set[str] = set()
    for lst in glob.glob(os.path.join(info_dir, "*.list")):
        pkg = os.path.basename(lst)[:-5].split(":")[0]
        if DENY_PACKAGE_RE.search(pkg):
            with open(lst, encoding="utf-8", errors="replace") as f:
                out.update(line.rstrip("\n") for line in f if line.strip())
    return frozenset(out)


def _path_deny_reason(path: str) -> str | None:
    low = path.lower()
    for d in DENY_DIRS:
        if low == d or low.startswith(d.rstrip("/") + "/"):
            return f"under {d}"
    for s in DENY_SUBSTRINGS:
        if s in low:
            return f"path contains {s!r}"
    tokens = set(re.split(r"[^a-z0-9]+", low))
    for name in DENY_NAMES:
        if name in tokens:
            return f"path has the word {name!r}"
    return None


def deny_reason(path: str) -> str | None:
    """Why `path` may not enter the corpus (a Plasma/KDE, GNOME, MATE or UKUI file), or None if allowed.

    Checked on the path as given and on its resolved target (symlinks), by name and by dpkg ownership.
    """
    real = os.path.realpath(path)
    for p in dict.fromkeys((os.path.abspath(path), real)):
        reason = _path_deny_reason(p)
        if reason:
            return reason
    owned = _denied_owned_files(DPKG_INFO_DIR)
    if os.path.abspath(path) in owned or real in owned:
        return "owned by a denied package"
    return None


def check_allowed(path: str) -> None:
    """Raise ValueError if `path` is on the deny-list (see `deny_reason`)."""
    reason = deny_reason(path)
    if reason:
        raise ValueError(f"{path}: refused by the photo-corpus deny-list ({reason}); Plasma/KDE, GNOME, MATE "
                         f"and UKUI wallpapers are held out")


# ------------------------------------------------------------------------------------------------
# listing photographs


def _dpkg_list(pkg: str) -> set[str] | None:
    """Files dpkg lists for an installed package, or None if it is not installed."""
    arch_lists = sorted(glob.glob(os.path.join(glob.escape(DPKG_INFO_DIR), f"{glob.escape(pkg)}:*.list")))
    for path in [os.path.join(DPKG_INFO_DIR, f"{pkg}.list"), *arch_lists]:
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                return {line.rstrip("\n") for line in f if line.strip()}
    return None


def _skimage_data_dir() -> str | None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _missing(name: str, entry: dict, detail: str) -> FileNotFoundError:
    if entry.get("pip"):
        how = f"the Python package {entry['pip']} (pip install {entry['pip']}; it is in setup.py)"
    else:
        pkgs = " ".join(entry.get("apt", ()))
        how = f"the Debian package(s) {pkgs} (apt-get install {pkgs}; scripts/setup_env.sh does it)"
    return FileNotFoundError(f"photo source {name!r} is missing ({detail}): install {how}")


def _source_candidates(name: str, entry: dict) -> list[str]:
    """All candidate files of one source, before any image check. Raises FileNotFoundError if absent."""
    if "samples" in entry:
        data_dir = entry.get("dir") or _skimage_data_dir()
        if not data_dir or not os.path.isdir(data_dir):
            raise _missing(name, entry, f"no sample folder {data_dir or 'skimage/data'}")
        out = []
        for sample in entry["samples"]:
            hits = sorted(p for p in glob.glob(os.path.join(glob.escape(data_dir), sample + ".*"))
                          if p.lower().endswith(EXTENSIONS))
            if not hits:
                raise _missing(name, entry, f"sample {sample!r} not in {data_dir}")
            out.append(hits[0])
        return out
    owned: set[str] | None = None
    if entry.get("owned", True) and entry.get("apt"):
        owned = set()
        for pkg in entry["apt"]:
            files = _dpkg_list(pkg)
            if files is None:
                raise _missing(name, entry, f"{pkg} is not installed")
            owned |= files
    found: set[str] = set()
    for pattern in entry.get("globs", ()):
        found.update(glob.glob(pattern, recursive=True))
    if owned is not None:
        found &= owned
    excl = entry.get("exclude", ())
    found = {p for p in found if p.lower().endswith(EXTENSIONS) and os.path.isfile(p)
             and not any(fnmatch.fnmatch(p, e) for e in excl)}
    if not found:
        raise _missing(name, entry, f"no image matches {list(entry.get('globs', ()))}")
    return sorted(found)


def _photo_check(im: Image.Image, min_side: int) -> tuple[str | None, np.ndarray | None]:
    """(reason to reject, None) or (None, grey thumbnail of at most 128 px as float32 0-255).

    Colour statistics are taken on a 256x256 nearest-neighbour sample (exact colours survive): a picture
    whose 16 most common colours cover more than 60% of it is flat colour or line-art (for a grey picture:
    fewer than 64 grey levels, or 16 levels cover more than 90%).
    """
    w, h = im.size
    if min(w, h) < min_side:
        return f"small ({w}x{h} < {min_side})", None
    im.draft("RGB", (256, 256))  # JPEG: decode at the smallest DCT scale still >= 256 px
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    img = im.convert("RGBA" if has_alpha else "RGB")
    sample = np.asarray(img.resize((256, 256), Image.Resampling.NEAREST))
    if has_alpha and np.mean(sample[..., 3] < 250) > 0.02:
        return "transparent (logo or cut-out)", None
    rgb = sample[..., :3].reshape(-1, 3).astype(np.int32)
    counts = np.sort(np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2], return_counts=True)[1])[::-1]
    top16 = counts[:16].sum() / len(rgb)
    if np.mean((rgb[:, 0] == rgb[:, 1]) & (rgb[:, 1] == rgb[:, 2])) > 0.9:  # a grey picture
        if len(counts) < 64 or top16 > 0.9:
            return "few grey levels (flat or line-art)", None
    elif top16 > 0.6:
        return "few colours (flat colour or line-art)", None
    grey_im = img.convert("L")
    grey_im.thumbnail((128, 128), Image.Resampling.BOX)
    grey = np.asarray(grey_im, np.float32)
    if grey.std() < 6.0:
        return "flat", None
    return None, grey


def _signature(grey: np.ndarray) -> np.ndarray:
    """Two z-scored 16x16 thumbnails (whole frame squashed; centre square), flattened: (2, 256) float32."""
    h, w = grey.shape
    s = min(h, w)
    im = Image.fromarray(grey)
    full = np.asarray(im.resize((16, 16), Image.Resampling.BOX), np.float32)
    top, left = (h - s) // 2, (w - s) // 2
    centre = np.asarray(im.resize((16, 16), Image.Resampling.BOX, box=(left, top, left + s, top + s)), np.float32)
    return np.stack([_zscore(full.ravel()), _zscore(centre.ravel())])


def _zscore(v: np.ndarray) -> np.ndarray:
    v = v - v.mean(axis=-1, keepdims=True)
    return v / np.maximum(v.std(axis=-1, keepdims=True), 1e-3)


def artwork_key(path: str) -> str:
    """A file's name with its size tokens removed, with its folder: one artwork shipped at several sizes.

    'backgrounds/sway/Sway_Wallpaper_Blue_1920x1080_Portrait.png' and '.../Sway_Wallpaper_Blue_768x1024.png'
    give one key, as do 'grub-16x9.png' and 'grub-4x3.png' in one folder; 'beach1.jpg' and 'beach2.jpg' do
    not (only tokens that are numbers, WxH sizes or an orientation are removed).
    """
    stem = os.path.splitext(os.path.basename(path))[0].lower()
    tokens = [t for t in re.split(r"[^a-z0-9]+", stem)
              if t and not re.fullmatch(r"\d+|\d+x\d+|portrait|landscape|hd|uhd|4k|\d+k|\d+p", t)]
    return os.path.join(os.path.dirname(path), "-".join(tokens))


def photo_files(sources: Iterable[str] | str, *, min_side: int = 256, same_picture: float = 0.2,
                rejected: list | None = None) -> list[PhotoFile]:
    """The photographic raster files of `sources` (PACKAGES keys), one per picture, in a fixed order.

    Keeps JPEG/PNG/WebP files whose short side is >= `min_side` px; drops denied paths (`deny_reason`),
    transparent images (logos, cut-outs), images of few colours (flat colour, line-art) and flat ones.
    The same picture shipped several times (several resolutions or aspect ratios, or in two sources) is
    kept once, the file with the most pixels: two files are one picture when they have the same
    `artwork_key`, or when their z-scored 16x16
    grey thumbnails (whole frame, or centre square) are closer than `same_picture` (RMS, in std units;
    whole landscapes of sky over ground come within 0.3 of each other, so keep it tight). Order: sources
    as given, then path.

    Each file is read once here, as a small preview (JPEGs by PIL's draft, at 1/8 of their size or less).
    `rejected`, if a list, receives (path, reason) for every file left out. Raises FileNotFoundError
    (naming the package to install) when a source is missing, KeyError for an unknown source name.
    """
    names = [sources] if isinstance(sources, str) else list(sources)
    unknown = [n for n in names if n not in PACKAGES]
    if unknown:
        raise KeyError(f"unknown photo source(s) {unknown}; known: {sorted(PACKAGES)}")
    rej = rejected if rejected is not None else []
    cands: list[tuple[str, str, int, np.ndarray, str]] = []  # source, path, pixels, signature, artwork key
    seen: set[str] = set()
    for name in names:
        for path in _source_candidates(name, PACKAGES[name]):
            real = os.path.realpath(path)
            if real in seen:
                rej.append((path, "same file as an earlier one"))
                continue
            seen.add(real)
            reason = deny_reason(path)
            if reason:
                rej.append((path, f"denied: {reason}"))
                continue
            try:
                with Image.open(path) as im:
                    w, h = im.size
                    reason, grey = _photo_check(im, min_side)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                rej.append((path, f"unreadable: {e}"))
                continue
            if reason:
                rej.append((path, reason))
                continue
            cands.append((name, path, w * h, _signature(grey), artwork_key(path)))
    # one file per picture: the largest; ties by source order then path
    order = sorted(range(len(cands)), key=lambda i: (-cands[i][2], i))
    kept: list[int] = []
    owner: dict[str, str] = {}
    for i in order:
        name, path, _, sig, key = cands[i]
        if key in owner:
            rej.append((path, f"same artwork ({os.path.basename(key)!r}) as {owner[key]}"))
            continue
        dup = next((j for j in kept if _sig_close(sig, cands[j][3], same_picture)), None)
        if dup is not None:
            rej.append((path, f"same picture as {cands[dup][1]}"))
            continue
        kept.append(i)
        owner[key] = path
    return [PhotoFile(cands[i][0], cands[i][1]) for i in sorted(kept)]


def _sig_close(a: np.ndarray, b: np.ndarray, cut: float) -> bool:
    d = np.sqrt(np.mean((a[:, None, :] - b[None, :, :]) ** 2, axis=-1))  # 2x2: full/centre against both
    return bool(d.min() < cut)


# ------------------------------------------------------------------------------------------------
# tiling


def tile_layout(width: int, height: int, scales: Sequence[int] = (2, 4, 8), *, min_tile_px: int = 128,
                seed: int = 0) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """Where the tiles of a `width` x `height` photo lie: a list of (scale, block, box), box in pixels.

    The photo is covered (centred) by a grid of square blocks of side short_side / scales[0]; each block
    gets one scale k, cycling through the usable scales (those whose tile side short_side / k is at least
    `min_tile_px`), starting at an offset from `seed`. A block of scale k is cut into (k / k0)^2 tiles of
    side short_side / k. So tiles of one scale never overlap and tiles of different scales never share a
    pixel. `scales` must be increasing, each a multiple of the first.
    """
    scales = tuple(int(k) for k in scales)
    if not scales or any(k < 1 for k in scales) or list(scales) != sorted(set(scales)):
        raise ValueError(f"scales must be increasing positive integers, got {scales}")
    if any(k % scales[0] for k in scales):
        raise ValueError(f"every scale must be a multiple of the first, got {scales}")
    s = min(width, height)
    usable = [k for k in scales if s // k >= min_tile_px]
    if not usable:
        return []
    k0 = scales[0]
    mmax = usable[-1] // k0
    block = (s // k0) // mmax * mmax  # divisible by every sub-grid size
    if block == 0:
        return []
    nx, ny = width // block, height // block
    x0, y0 = (width - nx * block) // 2, (height - ny * block) // 2
    out = []
    for b in range(nx * ny):
        by, bx = divmod(b, nx)
        k = usable[(b + seed) % len(usable)]
        m = k // k0
        t = block // m
        for j in range(m):
            for i in range(m):
                left, top = x0 + bx * block + i * t, y0 + by * block + j * t
                out.append((k, b, (left, top, left + t, top + t)))
    return out


def _tile_one(photo: PhotoFile, size: int, scales: Sequence[int], min_tile_px: int,
              flat_cuts: tuple[float, float, float]) -> tuple[list, list, list, int]:
    """Decode one photo once and cut its tiles; flat ones are dropped at once (see `flatness`).

    Returns (RGB arrays (size, size, 3) uint8, 64x64 grey arrays, origins) of the tiles that are not
    flat, and the number of candidate tiles.
    """
    check_allowed(photo.path)
    with Image.open(photo.path) as im:
        w, h = im.size
        seed = zlib.crc32(os.path.basename(photo.path).encode())
        rows = PACKAGES.get(photo.source, {}).get("rows")  # (top, bottom) fractions of a 2:1 map's height
        y0, y1 = (round(h * rows[0]), round(h * rows[1])) if rows and abs(w / h - 2.0) < 0.05 else (0, h)
        layout = [(k, b, (l, t + y0, r_, b_ + y0))
                  for k, b, (l, t, r_, b_) in tile_layout(w, y1 - y0, scales, min_tile_px=min_tile_px, seed=seed)]
        if not layout:
            return [], [], [], 0
        smallest = min(box[2] - box[0] for _, _, box in layout)
        r = 1
        while smallest // (r * 2) >= size and r < 8:
            r *= 2
        if r > 1:
            im.draft("RGB", (w // r, h // r))  # JPEG: decode at 1/r directly (DCT scaling)
        rgb = im.convert("RGB")
    fx, fy = rgb.size[0] / w, rgb.size[1] / h
    min_std, min_grad, max_flat = flat_cuts
    arrays, greys, origins = [], [], []
    for k, b, (l, t, rr, bb) in layout:
        tile = rgb.resize((size, size), Image.Resampling.LANCZOS, box=(l * fx, t * fy, rr * fx, bb * fy),
                          reducing_gap=3.0)
        grey = _grey64(tile)
        std, grad, flat = (float(v[0]) for v in _flatness64(grey[None]))
        if std < min_std or grad < min_grad or flat > max_flat:
            continue
        arrays.append(np.asarray(tile, dtype=np.uint8))
        greys.append(grey)
        origins.append(TileOrigin(photo.source, photo.path, k, (l, t, rr, bb), b, w, h))
    return arrays, greys, origins, len(layout)


def _grey64(tile: Image.Image) -> np.ndarray:
    """64x64 grey (ITU-R 601 luma, by area) of one tile image, float32 0-255."""
    return np.asarray(tile.convert("L").resize((64, 64), Image.Resampling.BOX), np.float32)


def _greys(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8 (n, S, S, 3), got {tiles.dtype} {tiles.shape}")
    if len(tiles) == 0:
        return np.zeros((0, 64, 64), np.float32)
    return np.stack([_grey64(Image.fromarray(t)) for t in tiles])


def _flatness64(g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(g)
    if n == 0:
        z = np.zeros(0, np.float32)
        return z, z, z
    std = g.reshape(n, 64 * 64).std(axis=1)
    grad = np.abs(np.diff(g, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(g, axis=2)).mean(axis=(1, 2))
    flat = (g.reshape(n, 8, 8, 8, 8).std(axis=(2, 4)) < 3.0).mean(axis=(1, 2))
    return std.astype(np.float32), grad.astype(np.float32), flat.astype(np.float32)


def _thumbs64(g: np.ndarray) -> np.ndarray:
    return _zscore(g.reshape(len(g), 16, 4, 16, 4).mean(axis=(2, 4)).reshape(len(g), 16 * 16)).astype(np.float32)


def flatness(tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How flat each tile (n, S, S, 3) uint8 is: (grey std, mean gradient, flat fraction), three (n,) float32.

    Measured on a 64x64 grey version (0-255 levels, by area), so the numbers do not depend on S: `std`
    over the tile; `grad` the mean of |dx| + |dy| between neighbouring pixels; `flat fraction` the share
    of its 8x8-pixel cells whose std is below 3 levels (a plain wall with one small object is mostly flat).
    """
    return _flatness64(_greys(tiles))


def thumbnails(tiles: np.ndarray) -> np.ndarray:
    """Z-scored 16x16 grey thumbnails of tiles (n, S, S, 3) uint8: (n, 256) float32, zero mean, unit std.

    The RMS difference of two of these is the near-duplicate distance, sqrt(2 (1 - r)) with r the
    correlation of the thumbnails: 0 for copies, also after a brightness or contrast change.
    """
    return _thumbs64(_greys(tiles))


def thumbnail_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMS distances (len(a), len(b)) float32 between two sets of `thumbnails`."""
    r = np.clip(a @ b.T / a.shape[1], -1.0, 1.0)
    return np.sqrt(np.maximum(2.0 - 2.0 * r, 0.0)).astype(np.float32)


def near_duplicate_pairs(thumbs: np.ndarray, cut: float, block: int = 2048) -> np.ndarray:
    """All pairs (i, j), i < j, of `thumbnails` closer than `cut` (RMS): (m, 2) int64, sorted."""
    n = len(thumbs)
    pairs = [np.zeros((0, 2), np.int64)]
    for a in range(0, n, block):
        ii, jj = np.nonzero(thumbnail_distances(thumbs[a:a + block], thumbs[a:]) < cut)
        ii, jj = ii + a, jj + a
        keep = jj > ii
        pairs.append(np.stack([ii[keep], jj[keep]], axis=1).astype(np.int64))
    out = np.concatenate(pairs)
    return out[np.lexsort((out[:, 1], out[:, 0]))]


def drop_near_duplicates(thumbs: np.ndarray, cut: float) -> np.ndarray:
    """Greedy keep-first: a boolean (n,) mask with no two kept items closer than `cut` (see thumbnails)."""
    keep = np.ones(len(thumbs), bool)
    for i, j in near_duplicate_pairs(thumbs, cut):
        if keep[i]:
            keep[j] = False
    return keep


def tile_photos(photos: Sequence[PhotoFile | str], size: int = 256, scales: Sequence[int] = (2, 4, 8), *,
                min_tile_px: int | None = None, min_std: float = 14.0, min_grad: float = 4.0,
                max_flat: float = 0.6, near_dup: float = 0.25, threads: int | None = None,
                stats: dict | None = None) -> tuple[np.ndarray, list[TileOrigin]]:
    """Cut photos into distinct square tiles: (tiles uint8 (n, size, size, 3) RGB, provenance list of n).

    Each photo is decoded once (a big JPEG at a reduced scale by PIL's draft when its smallest tile still
    gets >= `size` px) and laid out by `tile_layout`: one scale per disjoint block; a tile's side is 1/k of
    the photo's short side for k in `scales`, and at least `min_tile_px` source px (default size // 2, so
    no tile is enlarged more than 2x). Tiles are resized to `size` x `size` with LANCZOS (after an integer
    box reduction when much larger). Dropped, in this order: flat tiles (`flatness`: grey std < `min_std`,
    mean gradient < `min_grad`, or more than `max_flat` of the cells flat), then every tile whose
    `thumbnails` distance to an earlier kept tile is below `near_dup` (greedy keep-first), so no two
    tiles returned are closer than `near_dup`. Order: photos as given, then blocks in raster order.

    `stats`, if a dict, receives the counts: photos, photos_without_tiles (too small for a tile, or every
    tile flat), candidates, flat, near_duplicate, kept. `threads` decode photos in parallel (default: 2,
    or the cores if fewer); the result does not depend on it.
    """
    photos = [p if isinstance(p, PhotoFile) else PhotoFile("file", str(p)) for p in photos]
    min_tile_px = size // 2 if min_tile_px is None else int(min_tile_px)
    threads = threads or min(2, os.cpu_count() or 1)
    work = functools.partial(_tile_one, size=size, scales=tuple(scales), min_tile_px=min_tile_px,
                             flat_cuts=(min_std, min_grad, max_flat))
    if threads > 1 and len(photos) > 1:
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(work, photos))
    else:
        results = [work(p) for p in photos]
    origins = [o for r in results for o in r[2]]
    n_cand = sum(r[3] for r in results)
    greys = np.stack([g for r in results for g in r[1]]) if origins else np.zeros((0, 64, 64), np.float32)
    keep = drop_near_duplicates(_thumbs64(greys), near_dup)
    idx = np.nonzero(keep)[0]
    arrays = [a for r in results for a in r[0]]
    tiles = np.empty((len(idx), size, size, 3), np.uint8)
    for n, i in enumerate(idx):
        tiles[n] = arrays[i]
    counts = {"photos": len(photos), "photos_without_tiles": sum(1 for r in results if not r[2]),
              "candidates": n_cand, "flat": n_cand - len(origins), "near_duplicate": int((~keep).sum()),
              "kept": len(idx)}
    log.info("tile_photos: %s", counts)
    if stats is not None:
        stats.update(counts)
    return tiles, [origins[i] for i in idx]


# ------------------------------------------------------------------------------------------------
# split by package


def build_split(train: Sequence[str] = DEFAULT_SPLIT["train"], heldout: Sequence[str] = DEFAULT_SPLIT["heldout"],
                size: int = 256, *, near_dup: float = 0.25, stats: dict | None = None,
                **tile_kw) -> dict[str, tuple[np.ndarray, list[TileOrigin]]]:
    """Tiles of the `train` sources and of the `heldout` sources (PACKAGES keys, disjoint lists).

    Returns {"train": (tiles, provenance), "heldout": (tiles, provenance)} as from `tile_photos`. No item
    of one side is a copy of the other's: photos are deduplicated across both sides together
    (`photo_files`), and held-out tiles within `near_dup` of a training tile are dropped. `stats`, if a
    dict, gets {"train": counts, "heldout": counts} (tile_photos's, plus "cross_duplicate" for heldout).
    """
    train, heldout = list(train), list(heldout)
    both = set(train) & set(heldout)
    if both:
        raise ValueError(f"sources on both sides of the split: {sorted(both)}")
    files = photo_files(train + heldout)
    side = {n: "train" for n in train} | {n: "heldout" for n in heldout}
    out, counts = {}, {}
    for name in ("train", "heldout"):
        st: dict = {}
        out[name] = tile_photos([f for f in files if side[f.source] == name], size, near_dup=near_dup,
                                stats=st, **tile_kw)
        counts[name] = st
    if len(out["train"][0]) and len(out["heldout"][0]):
        ta, ha = thumbnails(out["train"][0]), thumbnails(out["heldout"][0])
        close = np.zeros(len(ha), bool)
        for a in range(0, len(ha), 1024):
            close[a:a + 1024] = (thumbnail_distances(ha[a:a + 1024], ta) < near_dup).any(axis=1)
        tiles, prov = out["heldout"]
        out["heldout"] = (np.ascontiguousarray(tiles[~close]), [p for p, c in zip(prov, close) if not c])
        counts["heldout"]["cross_duplicate"] = int(close.sum())
        counts["heldout"]["kept"] = len(out["heldout"][1])
    if stats is not None:
        stats.update(counts)
    return out


def apt_packages(sources: Iterable[str] | None = None) -> list[str]:
    """The Debian packages the given sources (default: all of PACKAGES) need, in PACKAGES order."""
    names = list(PACKAGES) if sources is None else list(sources)
    return list(dict.fromkeys(p for n in names for p in PACKAGES[n].get("apt", ())))


def contact_sheet(tiles: np.ndarray, cols: int = 10, pad: int = 2, thumb: int | None = None) -> np.ndarray:
    """A grid image of tiles (n, S, S, 3) uint8: (rows * (T + pad), cols * (T + pad), 3) uint8, white gaps,
    T = `thumb` (tiles shrunk with LANCZOS) or S."""
    tiles = np.asarray(tiles)
    n, s = len(tiles), tiles.shape[1]
    t = thumb or s
    rows = max(1, -(-n // cols))
    sheet = np.full((rows * (t + pad), cols * (t + pad), 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        if t != s:
            tile = np.asarray(Image.fromarray(tile).resize((t, t), Image.Resampling.LANCZOS))
        r, c = divmod(i, cols)
        sheet[r * (t + pad):r * (t + pad) + t, c * (t + pad):c * (t + pad) + t] = tile
    return sheet
