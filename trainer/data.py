"""Fashion-MNIST from its IDX files (the Debian package `dataset-fashion-mnist` installs them).

No TensorFlow here: the arrays are plain numpy.
"""
from __future__ import annotations

import functools
import gzip
import os
import sys

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


# --- other sources: image folders, pairs, unlabelled folders, NumPy arrays -----------------------------------
#
# Every image goes through siamese_core.decode.decode_image (the one definition of decode: any format, size
# or mode -> the encoder's input size and channels, uint8), so training sees exactly what the embed pipeline
# will feed the model.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
SOURCES = ("fashion_mnist", "folder", "pairs", "unlabelled", "npz", "photo_corpus")


class LabelledImages(tuple):
    """(images uint8 (n, H, W, C), labels int64 (n,)) plus what they mean: `names` (label id -> class name,
    pair name or file name), `paths` (n,) source files ("" for arrays), `kind` ("class", "pair" or
    "instance": with "instance" every image is its own label)."""

    def __new__(cls, images, labels, names, paths, kind):
        self = super().__new__(cls, (images, labels))
        self.images, self.labels, self.names, self.paths, self.kind = images, labels, list(names), list(paths), kind
        return self


def _is_remote(path: str) -> bool:
    return "://" in path


def _image_files(directory: str) -> list[str]:
    """Names of the image files directly in `directory` (local, or gs:// and other Beam filesystems), sorted."""
    if _is_remote(directory):
        from apache_beam.io.filesystems import FileSystems
        prefix = directory.rstrip("/") + "/"
        found = FileSystems.match([prefix + "*"])[0].metadata_list
        names = sorted(m.path[len(prefix):] for m in found)
        names = [n for n in names if n and "/" not in n and n.lower().endswith(IMAGE_EXTENSIONS)]
        if not names:
            raise FileNotFoundError(f"{directory}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return names
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: not a directory")
    return sorted(f for f in os.listdir(directory)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, f)))


def _read_bytes(path: str) -> bytes:
    """A file's bytes, local or through Beam's FileSystems (gs://)."""
    if _is_remote(path):
        from apache_beam.io.filesystem import CompressionTypes
        from apache_beam.io.filesystems import FileSystems
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def decode_files(paths: list[str], input_spec: dict) -> np.ndarray:
    """Decode image files -> uint8 (n, H, W, C) of the spec's size/channels (siamese_core.decode).

    A file that does not decode raises ValueError naming it and the reason (training data should be clean;
    the embed pipeline is where bad files are tolerated and logged)."""
    from siamese_core.decode import DecodeError, decode_image, spec_shape
    h, w, c = spec_shape(input_spec)
    out = np.empty((len(paths), h, w, c), np.uint8)
    for i, path in enumerate(paths):
        data = _read_bytes(path)
        try:
            out[i] = decode_image(data, input_spec).pixels
        except DecodeError as err:
            raise ValueError(f"{path}: cannot decode ({err})") from None
    return out


def load_image_folder(path: str, input_spec: dict) -> LabelledImages:
    """A folder with one subfolder per class (path/<class>/<image>): labels are the subfolders in sorted
    order (names = subfolder names). Subfolders without images are skipped."""
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    files, labels, names = [], [], []
    for name in classes:
        members = _image_files(os.path.join(path, name))
        if not members:
            continue
        files += [os.path.join(path, name, f) for f in members]
        labels += [len(names)] * len(members)
        names.append(name)
    if len(names) < 2:
        raise ValueError(f"{path}: a class folder needs at least two subfolders of images, found {len(names)}")
    return LabelledImages(decode_files(files, input_spec), np.asarray(labels, np.int64), names, files, "class")


def load_pairs(path: str, input_spec: dict, folders: tuple[str, str] | None = None) -> LabelledImages:
    """The pairs layout (as in Totally-Looks-Like): two folders whose same-named files are positive pairs.

    path holds exactly two subfolders (or name them with `folders`); a file name present in both is a pair,
    others are ignored. Returns 2 images per pair, labels = pair index (so the two halves of a pair are each
    other's only positive and every other pair's images are negatives), names = the shared file names.
    """
    if folders is None:
        subs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
        if len(subs) != 2:
            raise ValueError(f"{path}: the pairs layout needs exactly two subfolders, found {subs}")
        folders = (subs[0], subs[1])
    left, right = (os.path.join(path, f) for f in folders)
    common = sorted(set(_image_files(left)) & set(_image_files(right)))
    if len(common) < 2:
        raise ValueError(f"{path}: fewer than two same-named files in {folders[0]}/ and {folders[1]}/")
    files = [os.path.join(d, f) for f in common for d in (left, right)]  # pair i -> rows 2i, 2i+1
    labels = np.repeat(np.arange(len(common), dtype=np.int64), 2)
    return LabelledImages(decode_files(files, input_spec), labels, common, files, "pair")


def load_unlabelled(path: str, input_spec: dict) -> LabelledImages:
    """An unlabelled folder of images (instance mode; local or gs://): every image is its own label. Files
    that do not decode are skipped with a warning naming them (a real catalogue has some). Each file is
    read once."""
    from siamese_core.decode import DecodeError, decode_image, spec_shape
    files, pixels, bad = [], [], {}
    for f in _image_files(path):
        full = path.rstrip("/") + "/" + f if _is_remote(path) else os.path.join(path, f)
        try:
            pixels.append(decode_image(_read_bytes(full), input_spec).pixels)
            files.append(full)
        except (DecodeError, OSError) as err:
            bad[full] = str(err)
    if bad:
        shown = ", ".join(f"{os.path.basename(p)} ({r})" for p, r in list(bad.items())[:5])
        print(f"warning: {path}: skipped {len(bad)} files that do not decode: {shown}"
              f"{' ...' if len(bad) > 5 else ''}", file=sys.stderr)
    if len(files) < 2:
        raise ValueError(f"{path}: instance mode needs at least two images that decode, found {len(files)}")
    names = [f.rsplit("/", 1)[-1] for f in files]
    images = np.stack(pixels).astype(np.uint8, copy=False).reshape((len(files),) + spec_shape(input_spec))
    return LabelledImages(images, np.arange(len(files), dtype=np.int64), names, files, "instance")


def load_npz(path: str, input_spec: dict | None = None) -> LabelledImages:
    """NumPy arrays in a .npz: `images` (or `x`) uint8 (n, H, W[, C]) and optionally `labels` (or `y`)
    int (n,). Without labels every image is its own label (instance mode). Images whose size or channels
    differ from input_spec are converted through the same decode path (PNG round trip)."""
    from siamese_core.decode import spec_shape
    with np.load(path, allow_pickle=False) as z:
        key = "images" if "images" in z else "x" if "x" in z else None
        if key is None:
            raise ValueError(f"{path}: no 'images' (or 'x') array; found {sorted(z.files)}")
        images = np.asarray(z[key])
        lab_key = "labels" if "labels" in z else "y" if "y" in z else None
        labels = np.asarray(z[lab_key]).astype(np.int64).reshape(-1) if lab_key else None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"{path}: images must be (n, H, W) or (n, H, W, C), got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8 pixels 0..255, got {images.dtype}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    if input_spec is not None and images.shape[1:] != spec_shape(input_spec):
        images = convert_arrays(images, input_spec)
    n = len(images)
    if labels is None:
        return LabelledImages(images, np.arange(n, dtype=np.int64), [str(i) for i in range(n)], [""] * n,
                              "instance")
    names = [str(v) for v in np.unique(labels)]
    _, labels = np.unique(labels, return_inverse=True)
    return LabelledImages(images, labels.astype(np.int64), names, [""] * n, "class")


def convert_arrays(images: np.ndarray, input_spec: dict) -> np.ndarray:
    """uint8 (n, H, W[, C]) of any size -> the spec's size and channels, through decode_image (PNG bytes),
    so arrays are converted exactly like files."""
    import io

    from PIL import Image

    from siamese_core.decode import decode_image, spec_shape
    h, w, c = spec_shape(input_spec)
    out = np.empty((len(images), h, w, c), np.uint8)
    for i, img in enumerate(images):
        img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out[i] = decode_image(buf.getvalue(), input_spec).pixels
    return out


@functools.lru_cache(maxsize=2)
def _corpus_tiles(sources: tuple[str, ...]) -> np.ndarray:
    from trainer import photo_corpus
    tiles, _ = photo_corpus.tile_photos(photo_corpus.photo_files(sources))
    return tiles


def load_photo_corpus(path: str | None, input_spec: dict) -> LabelledImages:
    """Tiles of the Debian photo corpus (trainer.photo_corpus) as an unlabelled instance-mode source. `path`
    names its sources, comma-separated (default: photo_corpus.DEFAULT_SPLIT["train"], so the held-out
    packages stay unseen); each tile is converted to the input spec through decode (convert_arrays)."""
    from trainer import photo_corpus
    names = tuple(x.strip() for x in (path or "").split(",") if x.strip()) or photo_corpus.DEFAULT_SPLIT["train"]
    tiles = _corpus_tiles(names)
    n = len(tiles)
    return LabelledImages(convert_arrays(tiles, input_spec), np.arange(n, dtype=np.int64),
                          [str(i) for i in range(n)], [""] * n, "instance")


def load_source(kind: str, path: str | None, input_spec: dict) -> LabelledImages:
    """Load a training source by name (SOURCES). fashion_mnist: `path` is the IDX directory (optional) and
    this returns the TRAIN split; the others read `path`."""
    if kind == "fashion_mnist":
        images, labels = load_fashion_mnist("train", path)
        return LabelledImages(images[..., None], labels, list(CLASS_NAMES), [""] * len(labels), "class")
    if kind == "photo_corpus":
        return load_photo_corpus(path, input_spec)
    if not path:
        raise ValueError(f"--data {kind} needs --data_path")
    loaders = {"folder": load_image_folder, "pairs": load_pairs, "unlabelled": load_unlabelled, "npz": load_npz}
    if kind not in loaders:
        raise ValueError(f"data source must be one of {SOURCES}, got {kind!r}")
    return loaders[kind](path, input_spec)
