"""Throughput of the Beam embed pipeline against a plain script doing the same decode and model.predict.

    .venv/bin/python bench/bench_embed.py [--images 10000] [--batch_size 256] [--modes in_memory,multi_processing]
                                          [--repeats 2] [--kind png|jpeg] [--work_dir /tmp/bench_embed]

Same model, same image files, same batch size, one run of this script:
- the model: `trainer.encoder.build_encoder()` at its defaults (the trained encoder's size: ~0.23 M
  parameters, 28x28x1 -> 64-d), exported with `siamese_core.artefact.export_encoder` (untrained weights: speed
  does not depend on them);
- the images: Fashion-MNIST test images written as PNG files (`--images` above 10,000 adds train
  images, all distinct, so no exact duplicate spares the pipeline an inference); `--kind jpeg` writes them
  instead as 256x256 RGB JPEGs (upscaled, colour-tinted, quality 90) that decode has to shrink to 28x28;
- plain: `load_encoder`, then for every file read its bytes and `decode_image` it, then one
  `model.predict(pixels, batch_size=B)`: the script the target is stated against;
- plain per batch: the same with `model.predict_on_batch` on each batch of B instead (what the pipeline's
  model handler calls; for this small model Keras' `predict` loop costs more than the model), reported
  as a second, stricter baseline;
- beam: `beam_pipeline.embed.run` end to end (pipeline construction, read, sha256, gather identical
  bytes, decode, RunInference at batches of B images (--batch_size), write templates
  and failures Parquet, read them back for the summary) on the DirectRunner in each of `--modes`.
Each timing is wall-clock seconds around the whole call (model load included in both), after one
untimed warm-up of the plain path on two batches (process-wide TensorFlow and PIL start-up costs); runs
are interleaved plain, beam mode 1, beam mode 2, ... `--repeats` times and the best of each is kept,
because the machine is shared. Prints one line per run and a summary with images/s and the ratio beam / plain.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def write_catalogue(directory: str, n: int, kind: str) -> list[str]:
    """Write `n` distinct Fashion-MNIST images as files under `directory` (reused if already there)."""
    from PIL import Image

    from trainer.data import load_fashion_mnist

    suffix = "png" if kind == "png" else "jpg"
    paths = [os.path.join(directory, f"item_{i:06d}.{suffix}") for i in range(n)]
    marker = os.path.join(directory, f".complete-{n}-{kind}")
    if os.path.exists(marker):
        return paths
    os.makedirs(directory, exist_ok=True)
    images, _ = load_fashion_mnist("test")
    if n > len(images):
        train, _ = load_fashion_mnist("train")
        images = np.concatenate([images, train])
    if n > len(images):
        raise SystemExit(f"--images {n}: Fashion-MNIST has only {len(images)} images")
    rng = np.random.default_rng(0)
    for path, image in zip(paths, images[:n]):
        buffer = io.BytesIO()
        if kind == "png":
            Image.fromarray(image).save(buffer, format="PNG")
        else:
            tint = rng.uniform(0.6, 1.0, 3)
            rgb = (image[:, :, None] * tint[None, None, :]).astype(np.uint8)
            Image.fromarray(rgb).resize((256, 256), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
    open(marker, "w").close()
    return paths


def export_model(directory: str) -> str:
    """Export `build_encoder()` at its defaults to `directory` (reused if already there)."""
    if not os.path.exists(os.path.join(directory, "model_card.json")):
        import keras

        from trainer.encoder import build_encoder
        from siamese_core.artefact import export_encoder

        keras.utils.set_random_seed(0)
        export_encoder(build_encoder(), directory, training={"note": "untrained benchmark model"},
                       data={"dataset": "none"}, metrics={}, thresholds={"instance": [], "class": []})
    return directory


def plain(paths: list[str], model_dir: str, batch_size: int, per_batch: bool = False) -> tuple[float, np.ndarray]:
    """The plain script: load, read + decode every file, then one model.predict(pixels, batch_size) (or,
    with `per_batch`, model.predict_on_batch on each batch: faster for a small model). (seconds,
    embeddings)."""
    from siamese_core.decode import decode_image
    from siamese_core.artefact import load_encoder

    start = time.perf_counter()
    model, card = load_encoder(model_dir)
    spec = card["input_spec"]
    pixels = []
    for path in paths:
        with open(path, "rb") as f:
            pixels.append(decode_image(f.read(), spec).pixels)
    x = np.stack(pixels).astype(np.float32)
    if per_batch:
        embeddings = np.concatenate([model.predict_on_batch(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    else:
        embeddings = model.predict(x, batch_size=batch_size, verbose=0)
    return time.perf_counter() - start, embeddings


def beam(glob: str, model_dir: str, out: str, batch_size: int, mode: str) -> tuple[float, dict]:
    """beam_pipeline.embed.run on the DirectRunner in `mode`. (seconds, summary)."""
    from beam_pipeline import embed

    argv = ["--input", glob, "--model_dir", model_dir, "--output", out, "--batch_size", str(batch_size),
            "--direct_running_mode", mode]
    if mode in ("multi_processing", "multi_threading"):
        argv += ["--direct_num_workers", str(os.cpu_count() or 2)]
    start = time.perf_counter()
    summary = embed.run(argv)
    return time.perf_counter() - start, summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--modes", default="in_memory,multi_processing",
                        help="Comma-separated DirectRunner modes to run (in_memory, multi_processing, multi_threading).")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kind", choices=["png", "jpeg"], default="png")
    parser.add_argument("--work_dir", default="/tmp/bench_embed")
    parser.add_argument("--check", action="store_true", help="Also check the pipeline's embeddings equal the plain ones.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    paths = write_catalogue(os.path.join(args.work_dir, f"catalogue_{args.kind}_{args.images}"), args.images, args.kind)
    model_dir = export_model(os.path.join(args.work_dir, "model"))
    glob = os.path.join(os.path.dirname(paths[0]), "*.png" if args.kind == "png" else "*.jpg")
    modes = [m for m in args.modes.split(",") if m]
    print(f"{args.images} {args.kind} images, batch {args.batch_size}, {os.cpu_count()} CPUs, modes {modes}", flush=True)

    # Warm-up, untimed: the first decode and predict in a process pay one-time costs (TensorFlow and PIL
    # initialisation) that neither contender should be charged for.
    plain(paths[:2 * args.batch_size], model_dir, args.batch_size)
    best = {"plain": float("inf"), "plain_per_batch": float("inf"), **{m: float("inf") for m in modes}}
    reference = None
    for repeat in range(args.repeats):
        seconds, reference = plain(paths, model_dir, args.batch_size)
        best["plain"] = min(best["plain"], seconds)
        print(f"  run {repeat + 1}: plain {seconds:.2f} s ({args.images / seconds:.0f} images/s)", flush=True)
        seconds, _ = plain(paths, model_dir, args.batch_size, per_batch=True)
        best["plain_per_batch"] = min(best["plain_per_batch"], seconds)
        print(f"  run {repeat + 1}: plain per batch {seconds:.2f} s ({args.images / seconds:.0f} images/s)", flush=True)
        for mode in modes:
            out = os.path.join(args.work_dir, f"out_{mode}")
            seconds, summary = beam(glob, model_dir, out, args.batch_size, mode)
            if summary["embedded"] != args.images or summary["failed"]:
                raise SystemExit(f"beam {mode}: {summary['embedded']} embedded, {summary['failed']} failed")
            best[mode] = min(best[mode], seconds)
            print(f"  run {repeat + 1}: beam {mode} {seconds:.2f} s ({args.images / seconds:.0f} images/s)",
                  flush=True)
            if args.check and repeat == 0:
                from beam_pipeline.io import read_table_dir
                from schemas.tables import embeddings_as_numpy

                table = read_table_dir(out, "templates").sort_by("item_id")
                order = np.argsort([os.path.basename(p) for p in paths])
                np.testing.assert_allclose(embeddings_as_numpy(table), reference[order], atol=1e-4)

    result = {"images": args.images, "kind": args.kind, "batch_size": args.batch_size,
              "plain_images_per_s": round(args.images / best["plain"], 1),
              "plain_per_batch_images_per_s": round(args.images / best["plain_per_batch"], 1)}
    print(f"best of {args.repeats}: plain {best['plain']:.2f} s = {args.images / best['plain']:.0f} images/s; "
          f"plain per batch {best['plain_per_batch']:.2f} s = {args.images / best['plain_per_batch']:.0f} images/s")
    for mode in modes:
        ratio = best["plain"] / best[mode]
        strict = best["plain_per_batch"] / best[mode]
        result[f"beam_{mode}_images_per_s"] = round(args.images / best[mode], 1)
        result[f"ratio_{mode}"] = round(ratio, 3)
        result[f"ratio_{mode}_vs_per_batch"] = round(strict, 3)
        print(f"best of {args.repeats}: beam {mode} {best[mode]:.2f} s = {args.images / best[mode]:.0f} images/s, "
              f"ratio beam/plain {ratio:.2f} (beam/plain per batch {strict:.2f})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
