"""The peers of bench/bench_neardup.py, as plain functions: imagededup's four hashes and fastdup.

Every function takes a flat folder of image files (item id = the file name) and returns a result dict:

    {"method", "tool", "version", "pairs": {(left_id, right_id): score} with left_id < right_id,
     "score": what the score means, "higher_is_better": bool, "params": {...}, "files": n,
     "skipped": [ids of the files the tool could not read], "seconds": wall seconds of the tool's work}

- imagededup (`hash_pairs`): PHash, DHash, WHash, AHash (64-bit hashes). The score is the Hamming distance
  between two hashes (0 = same hash; lower is more similar). One hashing pass gives every pair within
  `cap` bits, so every threshold 0..cap is read from one run; imagededup's own default is
  `max_distance_threshold=10` (IMAGEDEDUP_DEFAULT_DISTANCE).
- fastdup (`fastdup_pairs`): cosine similarity in [-1, 1] of fastdup's own 576-d embeddings (the ONNX model
  that ships inside its wheel; higher is more similar), for each image's `k` nearest neighbours whose
  similarity is >= `floor`. fastdup's defaults (`fastdup_default`): `run(nearest_neighbors_k=2,
  threshold=0.9, cc_threshold=0.96)`: similarity.csv keeps each image's 2 nearest neighbours at >= 0.9
  (its summary calls d > 0.90 "above threshold", > 0.98 "nearly identical", > 0.99 "identical"), and its
  connected components, cut at 0.96, are its near-duplicate groups ("identical images or images that went
  simple transformations like scaling, flip, zoom in", in fastdup's docstring).

Installing them (neither pulls torch, and the project venv keeps its numpy 2 / Pillow / scikit-learn):

    pip install --no-deps imagededup==0.3.3.post2 fastdup==2.54 && pip install -e '.[neardup]'

- imagededup's wheel requires torch + torchvision (pip would bring torch with the CUDA stack, several GB)
  only for its CNN method; `from imagededup.methods import PHash` runs `imagededup/methods/__init__.py`,
  which imports the CNN module (torch), and `imagededup/utils/__init__.py` (torchvision). The hashing
  code itself needs numpy, scipy, PyWavelets, Pillow, scikit-learn and tqdm; `_imagededup_hashing` loads
  `imagededup.methods.hashing` unchanged with those two package `__init__`s bypassed, so torch is never
  imported.
- fastdup's wheel (~88 MB, ~220 MB installed, its embedding model included) pins numpy<2, Pillow==10.3.0,
  scikit-learn==1.5.0, tqdm, setuptools, joblib and sentry-sdk exactly; with --no-deps it runs against the
  project's versions (checked with 2.54: numpy 2.4, Pillow 12.3, scikit-learn 1.9). The `neardup` extra
  of setup.py holds the light dependencies of both.

Offline: fastdup checks PyPI for a newer version on import and reports crashes and timings to Sentry
unless told not to. `_fastdup()` sets SENTRY_OPT_OUT=1 and FASTDUP_PRODUCTION=1 before importing it, and
runs pass run_sentry=False; traced with strace, such a run makes no network connection (without them it
tries DNS for both, and then fails on the removed `sentry_sdk.metrics.incr` of current sentry-sdk).

As a script (bench_neardup.py runs each peer so, in its own process, away from TensorFlow):

    python bench/peers.py phash --image_dir CAT/images --out phash.json [--cap 20]
    python bench/peers.py fastdup --image_dir CAT/images --work W/fastdup --out fastdup.json [--floor 0.5 --k 20]
    python bench/peers.py fastdup_default --image_dir CAT/images --work W/fastdup_default --out fd_default.json
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time
import types

HASHES = {"phash": "PHash", "dhash": "DHash", "whash": "WHash", "ahash": "AHash"}
IMAGEDEDUP_DEFAULT_DISTANCE = 10  # imagededup's find_duplicates(max_distance_threshold=10)
HASH_BITS = 64
FASTDUP_DEFAULT_K = 2             # fastdup.engine.Fastdup.run(nearest_neighbors_k=2, ...)
FASTDUP_DEFAULT_THRESHOLD = 0.9   # ... threshold=0.9 (similarity graph kept in similarity.csv)
FASTDUP_DEFAULT_CC_THRESHOLD = 0.96  # ... cc_threshold=0.96 (connected components: near-duplicate groups)
FASTDUP_ENV = {"SENTRY_OPT_OUT": "1", "FASTDUP_PRODUCTION": "1"}
INSTALL = "pip install --no-deps imagededup==0.3.3.post2 fastdup==2.54 && pip install -e '.[neardup]'"
METHODS = tuple(HASHES) + ("fastdup", "fastdup_default")


class PeerMissing(ImportError):
    """A peer's package is not installed; the message names it and how to install it."""

    def __init__(self, package: str, detail: str = ""):
        self.package = package
        super().__init__(f"{package} is not installed{': ' + detail if detail else ''}; install the peers "
                         f"with: {INSTALL}")


def image_files(image_dir: str) -> list[str]:
    """The item ids of a flat catalogue folder: the names of its regular files, sorted."""
    return sorted(name for name in os.listdir(image_dir) if os.path.isfile(os.path.join(image_dir, name)))


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


# -------------------------------------------------------------------------------------------- imagededup

def _imagededup_hashing():
    """imagededup.methods.hashing without torch: the real module, with the package `__init__`s of
    imagededup.methods (imports the CNN method: torch) and imagededup.utils (torchvision) bypassed."""
    if "imagededup.methods.hashing" in sys.modules:
        return sys.modules["imagededup.methods.hashing"]
    spec = importlib.util.find_spec("imagededup")
    if spec is None or not spec.origin:
        raise PeerMissing("imagededup")
    root = os.path.dirname(spec.origin)
    importlib.import_module("imagededup")
    for sub in ("methods", "utils"):
        name = f"imagededup.{sub}"
        if name in sys.modules:  # already imported for real (torch is there): use it as it is
            continue
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(root, sub)]
        package.__package__ = name
        package.__file__ = os.path.join(root, sub, "__init__.py")
        sys.modules[name] = package
    try:
        return importlib.import_module("imagededup.methods.hashing")
    except ImportError as err:  # e.g. PyWavelets missing
        raise PeerMissing(getattr(err, "name", None) or "a dependency of imagededup", str(err)) from err


def imagededup_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("imagededup")
    except Exception:
        return None


def hash_pairs(method: str, image_dir: str, cap: int = 20, workers: int | None = None) -> dict:
    """Every pair of `image_dir` whose imagededup `method` hashes ('phash', 'dhash', 'whash', 'ahash') are
    at most `cap` bits apart: {(left_id, right_id): hamming distance}. Files that do not decode are
    skipped by imagededup (and listed in "skipped")."""
    if method not in HASHES:
        raise ValueError(f"method must be one of {sorted(HASHES)}, got {method!r}")
    if not 0 <= cap <= HASH_BITS:
        raise ValueError(f"cap is a Hamming distance in 0..{HASH_BITS}, got {cap}")
    hashing = _imagededup_hashing()
    workers = workers or os.cpu_count() or 1
    files = image_files(image_dir)
    started = time.perf_counter()
    hasher = getattr(hashing, HASHES[method])(verbose=False)
    encodings = hasher.encode_images(image_dir=image_dir, num_enc_workers=workers)
    found = hasher.find_duplicates(encoding_map=encodings, max_distance_threshold=cap, scores=True,
                                   num_dist_workers=workers) if encodings else {}
    seconds = time.perf_counter() - started
    pairs: dict[tuple[str, str], int] = {}
    for left, near in found.items():
        for right, dist in near:
            if right != left:
                pairs[_pair(left, right)] = int(dist)
    return {
        "method": f"imagededup {HASHES[method]}", "tool": "imagededup", "version": imagededup_version(),
        "pairs": pairs, "score": f"Hamming distance between {HASH_BITS}-bit hashes (0 = same; lower is more "
                                 "similar)", "higher_is_better": False,
        "params": {"max_distance_threshold": cap, "default_distance": IMAGEDEDUP_DEFAULT_DISTANCE,
                   "search_method": "brute_force_cython", "workers": workers},
        "files": len(files), "skipped": sorted(set(files) - set(encodings)), "seconds": round(seconds, 3),
    }


# ----------------------------------------------------------------------------------------------- fastdup

def _fastdup():
    """fastdup, imported with telemetry and the PyPI version check off (FASTDUP_ENV)."""
    for key, value in FASTDUP_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import fastdup
    except ImportError as err:
        raise PeerMissing("fastdup" if getattr(err, "name", "") in (None, "fastdup") else err.name,
                          str(err)) from err
    return fastdup


def _fastdup_run(image_dir: str, work_dir: str, threads: int | None, **run_kwargs):
    fastdup = _fastdup()
    os.makedirs(work_dir, exist_ok=True)
    fd = fastdup.create(work_dir=work_dir, input_dir=os.path.abspath(image_dir))
    started = time.perf_counter()
    status = fd.run(overwrite=True, verbose=False, run_sentry=False, num_threads=threads, **run_kwargs)
    seconds = time.perf_counter() - started
    if status not in (0, None):
        raise RuntimeError(f"fastdup run failed with status {status} (see {work_dir})")
    return fastdup, fd, seconds


def _fastdup_valid(fd) -> set[str]:
    annotations = fd.annotations()
    if annotations is None or not len(annotations):
        return set()
    if "is_valid" in annotations.columns:
        annotations = annotations[annotations["is_valid"].astype(bool)]
    return {os.path.basename(str(f)) for f in annotations["filename"]}


def _fastdup_similarity(fd) -> dict[tuple[str, str], float]:
    sim = fd.similarity()
    pairs: dict[tuple[str, str], float] = {}
    if sim is None or not len(sim):
        return pairs
    for a, b, d in zip(sim["filename_from"], sim["filename_to"], sim["distance"]):
        a, b = os.path.basename(str(a)), os.path.basename(str(b))
        if a != b:
            key = _pair(a, b)
            pairs[key] = max(float(d), pairs.get(key, -2.0))  # both directions are listed
    return pairs


def _result(fastdup, name: str, pairs: dict, params: dict, files: list[str], valid: set[str],
            seconds: float) -> dict:
    return {
        "method": name, "tool": "fastdup", "version": getattr(fastdup, "__version__", None), "pairs": pairs,
        "score": "cosine similarity of fastdup's 576-d embeddings (in [-1, 1], 1 = identical; higher is more "
                 "similar)", "higher_is_better": True, "params": params, "files": len(files),
        "skipped": sorted(set(files) - valid), "seconds": round(seconds, 3),
    }


def fastdup_pairs(image_dir: str, work_dir: str, floor: float = 0.5, k: int = 20,
                  threads: int | None = None) -> dict:
    """fastdup's similarity of each image to its `k` nearest neighbours, kept when >= `floor`:
    {(left_id, right_id): cosine similarity}. fastdup's default approximate index (HNSW32) and model."""
    files = image_files(image_dir)
    fastdup, fd, seconds = _fastdup_run(image_dir, work_dir, threads, nearest_neighbors_k=k, threshold=floor)
    params = {"nearest_neighbors_k": k, "threshold": floor, "default_threshold": FASTDUP_DEFAULT_THRESHOLD,
              "default_cc_threshold": FASTDUP_DEFAULT_CC_THRESHOLD, "default_k": FASTDUP_DEFAULT_K,
              "nnf_mode": "HNSW32 (fastdup's default)"}
    return _result(fastdup, "fastdup", _fastdup_similarity(fd), params, files, _fastdup_valid(fd), seconds)


def fastdup_default(image_dir: str, work_dir: str, threads: int | None = None) -> dict:
    """fastdup at its defaults (k=2, threshold 0.9, cc_threshold 0.96): "pairs" = its similarity.csv
    (each image's 2 nearest neighbours at >= 0.9); "components" = its connected components (groups of
    2+ items), and "component_pairs" = every pair inside one component (score: 1.0)."""
    files = image_files(image_dir)
    fastdup, fd, seconds = _fastdup_run(image_dir, work_dir, threads)
    components: dict[int, list[str]] = {}
    cc, _ = fd.connected_components()
    if cc is not None and len(cc):
        for f, c in zip(cc["filename"], cc["component_id"]):
            components.setdefault(int(c), []).append(os.path.basename(str(f)))
    groups = sorted(sorted(m) for m in components.values() if len(m) > 1)
    component_pairs = {(a, b): 1.0 for m in groups for i, a in enumerate(m) for b in m[i + 1:]}
    params = {"nearest_neighbors_k": FASTDUP_DEFAULT_K, "threshold": FASTDUP_DEFAULT_THRESHOLD,
              "cc_threshold": FASTDUP_DEFAULT_CC_THRESHOLD, "nnf_mode": "HNSW32 (fastdup's default)"}
    result = _result(fastdup, "fastdup (defaults)", _fastdup_similarity(fd), params, files, _fastdup_valid(fd),
                     seconds)
    result.update(components=groups, component_pairs=component_pairs)
    return result


# ------------------------------------------------------------------------------------------------ script

def run_method(method: str, image_dir: str, work_dir: str | None = None, cap: int = 20, floor: float = 0.5,
               k: int = 20, threads: int | None = None) -> dict:
    """One peer by name (METHODS)."""
    if method in HASHES:
        return hash_pairs(method, image_dir, cap=cap, workers=threads)
    if work_dir is None:
        raise ValueError(f"{method} needs a work directory")
    if method == "fastdup":
        return fastdup_pairs(image_dir, work_dir, floor=floor, k=k, threads=threads)
    if method == "fastdup_default":
        return fastdup_default(image_dir, work_dir, threads=threads)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def to_json(result: dict) -> dict:
    """A result with its pair dicts as [left_id, right_id, score] lists."""
    out = dict(result)
    for key in ("pairs", "component_pairs"):
        if key in out:
            out[key] = [[a, b, s] for (a, b), s in sorted(out[key].items())]
    return out


def from_json(doc: dict) -> dict:
    """Inverse of to_json."""
    out = dict(doc)
    for key in ("pairs", "component_pairs"):
        if key in out:
            out[key] = {(a, b): s for a, b, s in out[key]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--image_dir", required=True, help="flat folder of image files (item id = file name)")
    parser.add_argument("--out", required=True, help="write the result here as JSON")
    parser.add_argument("--work", default=None, help="fastdup: its work directory")
    parser.add_argument("--cap", type=int, default=20, help="hashes: largest Hamming distance kept (default 20)")
    parser.add_argument("--floor", type=float, default=0.5, help="fastdup: lowest similarity kept (default 0.5)")
    parser.add_argument("--k", type=int, default=20, help="fastdup: nearest neighbours per image (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="worker processes / threads (default: cores)")
    args = parser.parse_args(argv)
    try:
        result = run_method(args.method, args.image_dir, args.work, cap=args.cap, floor=args.floor, k=args.k,
                            threads=args.threads)
    except PeerMissing as err:
        doc = {"method": args.method, "missing": err.package, "error": str(err)}
        code = 3
    else:
        doc, code = to_json(result), 0
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh)
    os.replace(tmp, args.out)
    return code


if __name__ == "__main__":
    sys.exit(main())
