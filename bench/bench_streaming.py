"""Latency of the streaming watcher: from a file written into a watched folder to its row in the output.

    .venv/bin/python bench/bench_streaming.py [--index 1000] [--files 20] [--every 1.5] [--poll_interval 5]
                                              [--work_dir /tmp/bench_streaming]

- the model: `trainer.encoder.build_encoder()` at its defaults (28x28x1 -> 64-d, ~0.23 M parameters),
  untrained (latency does not depend on the weights), as bench/bench_embed.py exports it;
- the index: `--index` Fashion-MNIST test images as PNG files, embedded by `siamese-dedup embed`;
- the watcher: `siamese-dedup watch` in a child process (the command a user runs, local runner) on an
  empty folder, against those templates at --threshold 0.99;
- the files: one warm-up file, written once the watcher has started and waited for until its row
  appears (start-up: Python, TensorFlow, the model and the index loading), then `--files` files, one every
  `--every` seconds, alternately a byte copy of a catalogue item under a new name and a Fashion-MNIST
  training image the catalogue does not hold; each is written beside the folder and renamed into it.
Per file, latency = its row's `reported_at` (the `checked` row) - the moment the rename returned, on the
same clock. Also reported: `processing` = reported_at - seen_at (read, decode, embed, match, write; the
rest is waiting for the next poll, up to --poll_interval). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

THRESHOLD = 0.99


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _drop(folder: str, name: str, data: bytes) -> float:
    """Write `name` whole into `folder` (beside it, then renamed); the time it appeared."""
    tmp = os.path.join(os.path.dirname(folder), f".{name}.part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(folder, name))
    return time.time()


def _reported(output: str, run_id: str) -> dict:
    """{item_id: row} of the checked and failures rows of run `run_id` so far."""
    from beam_pipeline import streaming

    rows = {}
    for kind in ("checked", "failures"):
        for row in streaming.read_rows(output, kind, run_id):
            rows[row["item_id"]] = {**row, "kind": kind}
    return rows


def _wait_for(output: str, run_id: str, names: list, timeout: float, proc) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = _reported(output, run_id)
        if all(n in rows for n in names):
            return rows
        if proc.poll() is not None:
            raise SystemExit(f"the watcher exited with status {proc.returncode} before reporting {names}")
        time.sleep(0.1)
    raise SystemExit(f"no rows for {[n for n in names if n not in _reported(output, run_id)]} after {timeout:.0f} s")


def _summary(values: list) -> dict:
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3),
            "min": round(min(values), 3)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=int, default=1000, help="Catalogue items in the index (default 1000).")
    parser.add_argument("--files", type=int, default=20, help="Files dropped into the watched folder (default 20).")
    parser.add_argument("--every", type=float, default=1.5, help="Seconds between two files (default 1.5).")
    parser.add_argument("--poll_interval", type=float, default=5.0,
                        help="The watcher's --poll_interval (default 5, the command's default).")
    parser.add_argument("--work_dir", default="/tmp/bench_streaming")
    args = parser.parse_args(argv)

    import bench_embed
    from trainer.data import load_fashion_mnist

    work = os.path.abspath(args.work_dir)
    model_dir = bench_embed.export_model(os.path.join(work, "model"))
    catalogue = os.path.join(work, "catalogue")
    paths = bench_embed.write_catalogue(catalogue, args.index, "png")
    templates = os.path.join(work, "index", "templates", "templates-*.parquet")
    if not os.path.exists(os.path.join(work, "index", f".complete-{args.index}")):
        from beam_pipeline import embed

        embed.run(["--input", os.path.join(catalogue, "*.png"), "--model_dir", model_dir,
                   "--output", os.path.join(work, "index")])
        open(os.path.join(work, "index", f".complete-{args.index}"), "w").close()

    folder, output = os.path.join(work, "drop"), os.path.join(work, "out")
    for d in (folder, output):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(folder)
    run_id = f"bench-{int(time.time())}"
    command = [sys.executable, "-m", "beam_pipeline.cli", "watch", "--input", os.path.join(folder, "*.png"),
               "--model_dir", model_dir, "--templates", templates, "--threshold", str(THRESHOLD),
               "--output", output, "--poll_interval", str(args.poll_interval), "--run_id", run_id]
    new_images, _ = load_fashion_mnist("train")
    log_path = os.path.join(work, "watch.log")
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(1.0)
        _drop(folder, "warm_up.png", _png(new_images[-1]))
        _wait_for(output, run_id, ["warm_up.png"], 300, proc)
        startup = time.time() - started
        written, copies = {}, {}
        for k in range(args.files):
            if k % 2 == 0:
                source = paths[(k * 37) % len(paths)]
                name = f"copy_{k:03d}.png"
                with open(source, "rb") as f:
                    data = f.read()
                copies[name] = os.path.basename(source)
            else:
                name, data = f"new_{k:03d}.png", _png(new_images[k])
            written[name] = _drop(folder, name, data)
            time.sleep(args.every)
        rows = _wait_for(output, run_id, list(written), 120 + 2 * args.poll_interval, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    from beam_pipeline import streaming

    latency = [streaming.parse_time(rows[n]["reported_at"]) - written[n] for n in written]
    processing = [streaming.parse_time(rows[n]["reported_at"]) - streaming.parse_time(rows[n]["seen_at"])
                  for n in written]
    duplicates = streaming.read_rows(output, "duplicates", run_id)
    found = {(d["item_id"], d["catalogue_item_id"]) for d in duplicates}
    result = {
        "benchmark": "streaming_latency", "index_items": args.index, "files": args.files, "every_s": args.every,
        "poll_interval_s": args.poll_interval, "threshold": THRESHOLD,
        "latency_s": _summary(latency), "processing_s": _summary(processing), "startup_s": round(startup, 3),
        "copies_found": sum((n, c) in found for n, c in copies.items()), "copies": len(copies),
        "failures": sum(rows[n]["kind"] == "failures" for n in written), "cpus": os.cpu_count(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
