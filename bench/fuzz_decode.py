"""Fuzz the decode stage through the real embed pipeline: mutated image files in, zero crashes, nothing lost.

    .venv/bin/python bench/fuzz_decode.py [--files 1000] [--seed 0] [--work_dir /tmp/fuzz_decode]
                                          [--model_dir DIR] [--max_pixels 50000000]

1. Seeds: small valid images in every accepted format and many modes (PNG L/RGB/RGBA/P+tRNS/16-bit/1-bit,
   JPEG RGB/L/CMYK/progressive/EXIF-rotated, GIF animated, WebP lossy/lossless/alpha/animated, BMP,
   TIFF raw/LZW/deflate/multi-page/CMYK/16-bit, PGM/PPM).
2. Mutants: `--files` files, each a seed put through one mutation (MUTATIONS): truncation anywhere or
   near the end, bit flips, random byte runs, a garbled or another format's header, huge or zero declared
   sizes (PNG IHDR with its CRC fixed, GIF screen and frame, BMP, JPEG SOF), a duplicated slice,
   trailing garbage, random bytes. Deterministic for a seed.
3. Direct: `decode_image` on every file in this process; anything but a DecodeError is a crash, and
   decodes over 2 s are listed as slow.
4. Pipeline: `beam_pipeline.embed.run` on the directory (DirectRunner): it must finish, every file must
   end in exactly one of templates / failures, and each file's outcome must be the one the direct decode
   gave (a template if it decoded, else a decode failure with the same reason; a file that decoded may
   still fail at inference or validation, e.g. when the model's embedding of it is all zeros).
Prints a table of outcomes per mutation and a JSON summary; exits 1 on any crash, lost item or mismatch.
The model is `trainer.encoder.build_encoder()` at its defaults, untrained (decode does not care), unless
--model_dir is given.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import struct
import sys
import time
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

SLOW_SECONDS = 2.0
_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif",
               "PPM": "ppm"}


# ------------------------------------------------------------------------------------------------- seeds


def seed_images(seed: int = 0) -> list[tuple[str, str, bytes]]:
    """(name, PIL format, bytes) of valid images covering the formats and modes decode accepts."""
    from PIL import Image

    rng = np.random.default_rng(seed)

    def noise(h, w, c=None):
        shape = (h, w) if c is None else (h, w, c)
        return rng.integers(0, 256, shape, dtype=np.uint8)

    def save(image, fmt, **kwargs):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    gray = Image.fromarray(noise(28, 28))
    rgb = Image.fromarray(noise(40, 52, 3))
    rgba = Image.fromarray(noise(30, 30, 4))
    palette = rgb.quantize(32)
    sixteen = Image.fromarray((rng.integers(0, 65536, (24, 20))).astype(np.uint16))
    bilevel = Image.fromarray(noise(32, 32) > 127)
    cmyk = Image.fromarray(noise(20, 24, 4), mode="CMYK")
    frames = [Image.fromarray(noise(24, 24)) for _ in range(3)]
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = Image.fromarray(noise(64, 96, 3)).resize((192, 128))
    seeds = [
        ("png_gray", "PNG", save(gray, "PNG")),
        ("png_rgb", "PNG", save(rgb, "PNG")),
        ("png_rgba", "PNG", save(rgba, "PNG")),
        ("png_palette_trns", "PNG", save(palette, "PNG", transparency=0)),
        ("png_16bit", "PNG", save(sixteen, "PNG")),
        ("png_1bit", "PNG", save(bilevel, "PNG")),
        ("png_optimized", "PNG", save(rgb, "PNG", optimize=True)),
        ("jpeg_rgb", "JPEG", save(photo, "JPEG", quality=85)),
        ("jpeg_gray", "JPEG", save(gray, "JPEG")),
        ("jpeg_cmyk", "JPEG", save(cmyk, "JPEG")),
        ("jpeg_progressive", "JPEG", save(photo, "JPEG", progressive=True)),
        ("jpeg_exif_rotated", "JPEG", save(photo, "JPEG", exif=exif)),
        ("gif_animated", "GIF", save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40)),
        ("gif_palette", "GIF", save(palette, "GIF")),
        ("webp_lossy", "WEBP", save(rgb, "WEBP", quality=80)),
        ("webp_lossless_alpha", "WEBP", save(rgba, "WEBP", lossless=True)),
        ("webp_animated", "WEBP", save(frames[0].convert("RGB"), "WEBP", save_all=True,
                                       append_images=[f.convert("RGB") for f in frames[1:]], duration=40)),
        ("bmp_rgb", "BMP", save(rgb, "BMP")),
        ("bmp_palette", "BMP", save(palette, "BMP")),
        ("tiff_raw", "TIFF", save(rgb, "TIFF")),
        ("tiff_lzw", "TIFF", save(rgb, "TIFF", compression="tiff_lzw")),
        ("tiff_deflate", "TIFF", save(gray, "TIFF", compression="tiff_adobe_deflate")),
        ("tiff_multipage", "TIFF", save(frames[0], "TIFF", save_all=True, append_images=frames[1:])),
        ("tiff_cmyk", "TIFF", save(cmyk, "TIFF")),
        ("tiff_16bit", "TIFF", save(sixteen, "TIFF")),
        ("pgm", "PPM", save(gray, "PPM")),
        ("ppm", "PPM", save(rgb, "PPM")),
    ]
    return seeds


# --------------------------------------------------------------------------------------------- mutations


def _png_dims(data: bytes, width: int, height: int) -> bytes:
    """Set a PNG's IHDR width/height and recompute the chunk CRC, so the header itself stays valid."""
    if data[12:16] != b"IHDR":
        return data
    ihdr = struct.pack(">II", width, height) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return data[:16] + ihdr + crc + data[33:]


def _gif_dims(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    out[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    frame = data.find(b"\x2c", 13)  # first image descriptor (approximately: the first 0x2C after the header)
    if frame > 0 and frame + 9 <= len(out):
        out[frame + 5:frame + 9] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    return bytes(out)


def _bmp_dims(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    out[18:26] = struct.pack("<ii", min(width, 2**31 - 1), min(height, 2**31 - 1))
    return bytes(out)


def _jpeg_dims(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        at = data.find(marker)
        if at > 0:
            out[at + 5:at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
            break
    return bytes(out)


_DIMS = {"PNG": _png_dims, "GIF": _gif_dims, "BMP": _bmp_dims, "JPEG": _jpeg_dims}
_MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP",
          b"P5\n", b"%!PS-Adobe-3.0 EPSF", b"\x00\x00\x01\x00", b"8BPS"]


def _truncate(data, fmt, rng):
    return data[: int(rng.integers(0, len(data)))]


def _truncate_tail(data, fmt, rng):
    return data[: max(0, len(data) - int(rng.integers(1, 65)))]


def _bit_flips(data, fmt, rng):
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 17))):
        i = int(rng.integers(0, len(out)))
        out[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _byte_run(data, fmt, rng):
    out = bytearray(data)
    n = int(rng.integers(1, 65))
    i = int(rng.integers(0, max(1, len(out) - n)))
    out[i:i + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return bytes(out)


def _header_garble(data, fmt, rng):
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        i = int(rng.integers(0, min(32, len(out))))
        out[i] = int(rng.integers(0, 256))
    return bytes(out)


def _wrong_header(data, fmt, rng):
    magic = _MAGIC[int(rng.integers(0, len(_MAGIC)))]
    return magic + data[len(magic):]


def _huge_dims(data, fmt, rng):
    sides = [7000, 30000, 65535, 100000, 2**31 - 1]
    width, height = (sides[int(rng.integers(0, len(sides)))] for _ in range(2))
    return _DIMS.get(fmt, _DIMS["PNG"])(data, width, height) if fmt in _DIMS else _bit_flips(data, fmt, rng)


def _zero_dims(data, fmt, rng):
    width, height = (0, int(rng.integers(1, 50))) if rng.random() < 0.5 else (int(rng.integers(1, 50)), 0)
    return _DIMS[fmt](data, width, height) if fmt in _DIMS else _truncate(data, fmt, rng)


def _duplicate_slice(data, fmt, rng):
    i = int(rng.integers(0, len(data)))
    j = min(len(data), i + int(rng.integers(1, 256)))
    return data[:j] + data[i:j] + data[j:]


def _trailing_garbage(data, fmt, rng):
    return data + rng.integers(0, 256, int(rng.integers(1, 512)), dtype=np.uint8).tobytes()


def _random_bytes(data, fmt, rng):
    return rng.integers(0, 256, int(rng.integers(0, 2048)), dtype=np.uint8).tobytes()


MUTATIONS = {
    "truncate": _truncate, "truncate_tail": _truncate_tail, "bit_flips": _bit_flips, "byte_run": _byte_run,
    "header_garble": _header_garble, "wrong_header": _wrong_header, "huge_dims": _huge_dims,
    "zero_dims": _zero_dims, "duplicate_slice": _duplicate_slice, "trailing_garbage": _trailing_garbage,
    "random_bytes": _random_bytes,
}


def make_corpus(directory: str, n: int, seed: int = 0) -> dict[str, tuple[str, str]]:
    """Write `n` mutants under `directory`; returns {file name: (mutation, seed name)}."""
    rng = np.random.default_rng(seed)
    seeds = seed_images(seed)
    names = list(MUTATIONS)
    os.makedirs(directory, exist_ok=True)
    corpus = {}
    for k in range(n):
        seed_name, fmt, data = seeds[k % len(seeds)]
        mutation = names[(k // len(seeds) + k) % len(names)]
        mutated = MUTATIONS[mutation](data, fmt, rng)
        name = f"{k:05d}_{mutation}_{seed_name}.{_EXTENSIONS[fmt]}"
        with open(os.path.join(directory, name), "wb") as f:
            f.write(mutated)
        corpus[name] = (mutation, seed_name)
    return corpus


# ------------------------------------------------------------------------------------------------- checks


def classify(data: bytes, input_spec: dict, max_pixels: int) -> tuple[str, float]:
    """('ok' | a DecodeError reason | 'crash: <Type>: <message>', seconds) of decode_image on `data`."""
    from siamese_core.decode import DecodeError, decode_image

    start = time.perf_counter()
    try:
        decode_image(data, input_spec, max_pixels)
        outcome = "ok"
    except DecodeError as err:
        outcome = err.reason
    except Exception as err:  # anything else escaping decode_image is a bug
        outcome = f"crash: {type(err).__name__}: {err}"[:300]
    return outcome, time.perf_counter() - start


def fuzz(directory: str, corpus: dict, model_dir: str, out_dir: str, max_pixels: int = 50_000_000,
         run_pipeline=None) -> dict:
    """Decode every file directly, then run the embed pipeline on `directory`; the summary of both.

    `run_pipeline(argv)` runs the pipeline (default: beam_pipeline.embed.run). The summary's 'problems'
    lists every crash, lost or doubled item and direct/pipeline mismatch (empty when all is well).
    """
    from beam_pipeline import embed
    from beam_pipeline.io import read_table_dir
    from siamese_core.artefact import load_model_card

    spec = load_model_card(model_dir)["input_spec"]
    direct, slow = {}, []
    for name in sorted(corpus):
        with open(os.path.join(directory, name), "rb") as f:
            direct[name], seconds = classify(f.read(), spec, max_pixels)
        if seconds > SLOW_SECONDS:
            slow.append((name, round(seconds, 2)))
    problems = [f"{name}: direct decode {outcome}" for name, outcome in direct.items() if outcome.startswith("crash")]

    start = time.perf_counter()
    try:
        summary = (run_pipeline or embed.run)(
            ["--input", os.path.join(directory, "*"), "--model_dir", model_dir, "--output", out_dir,
             "--max_pixels", str(max_pixels), "--run_id", "fuzz"])
    except Exception as err:  # the pipeline itself crashed: the worst outcome
        return {"files": len(corpus), "problems": [f"pipeline crashed: {type(err).__name__}: {err}"],
                "direct": dict(collections.Counter(direct.values())), "slow": slow}
    pipeline_seconds = time.perf_counter() - start
    templates = read_table_dir(out_dir, "templates").column("item_id").to_pylist()
    failures = read_table_dir(out_dir, "failures").to_pylist()
    outcome = {name: "ok" for name in templates}
    for row in failures:
        if row["item_id"] in outcome:
            problems.append(f"{row['item_id']}: in both tables or twice in failures")
        reason = row["error"].split(":", 2)[1].strip() if row["error"].startswith("DecodeError:") else row["stage"]
        outcome[row["item_id"]] = reason if row["stage"] == "decode" else f"{row['stage']}: {row['error']}"
    lost = sorted(set(corpus) - set(outcome))
    extra = sorted(set(outcome) - set(corpus))
    problems += [f"{name}: lost (in no table)" for name in lost] + [f"{name}: not an input" for name in extra]
    if len(templates) + len(failures) != len(corpus):
        problems.append(f"{len(templates)} templates + {len(failures)} failures != {len(corpus)} files")
    # A file that decodes may still fail later, at inference or validation (e.g. an image on which the
    # untrained model's embedding is all zeros): accounted for, and not a decode mismatch.
    after_decode = ("inference: ", "validate: ")
    problems += [f"{name}: direct {direct[name]} but pipeline {outcome[name]}"
                 for name in sorted(set(direct) & set(outcome)) if direct[name] != outcome[name]
                 and not direct[name].startswith("crash")
                 and not (direct[name] == "ok" and outcome[name].startswith(after_decode))]

    table = collections.defaultdict(collections.Counter)
    for name, (mutation, _) in corpus.items():
        table[mutation][outcome.get(name, "LOST")] += 1
    return {
        "files": len(corpus),
        "templates": len(templates),
        "failures": len(failures),
        "inferences_saved": summary["inferences_saved"],
        "pipeline_seconds": round(pipeline_seconds, 1),
        "outcomes": dict(collections.Counter(outcome.values())),
        "by_mutation": {m: dict(c) for m, c in sorted(table.items())},
        "slow": slow,
        "problems": problems,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="/tmp/fuzz_decode")
    parser.add_argument("--model_dir", default=None)
    parser.add_argument("--max_pixels", type=int, default=50_000_000)
    args = parser.parse_args(argv)

    model_dir = args.model_dir
    if model_dir is None:
        from bench_embed import export_model

        model_dir = export_model(os.path.join(args.work_dir, "model"))
    directory = os.path.join(args.work_dir, f"corpus_{args.files}_{args.seed}")
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            os.remove(os.path.join(directory, name))
    corpus = make_corpus(directory, args.files, args.seed)
    result = fuzz(directory, corpus, model_dir, os.path.join(args.work_dir, "out"), args.max_pixels)

    outcomes = sorted({o for c in result.get("by_mutation", {}).values() for o in c})
    print(f"{result['files']} mutated files ({len(seed_images(args.seed))} seeds x {len(MUTATIONS)} mutations), "
          f"seed {args.seed}")
    print(f"{'mutation':<18}" + "".join(f"{o[:14]:>15}" for o in outcomes))
    for mutation, counts in result.get("by_mutation", {}).items():
        print(f"{mutation:<18}" + "".join(f"{counts.get(o, 0):>15}" for o in outcomes))
    print(json.dumps({k: v for k, v in result.items() if k != "by_mutation"}, indent=1))
    print("OK: no crash, every file accounted for" if not result["problems"] else
          f"FAILED: {len(result['problems'])} problems")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
