"""What a nightly run costs against the full run it replaces, and whether its clusters are the same.

    flock /tmp/heavy.lock .venv/bin/python bench/bench_nightly.py --model_dir demo_output/model \
        [--items 50000] [--new_share 0.01] [--work /tmp/bench_nightly]

1. writes a catalogue of ITEMS Fashion-MNIST training images as PNG files (1 in 50 with a near copy: pixel
   noise of +-6; 1 in 50 with a re-saved copy: the same pixels, other PNG bytes);
2. the first nightly run on it: a full run (embed everything, match all pairs at --threshold, or at the
   threshold it self-calibrates without it, dedup);
3. adds new_share x ITEMS files (half new images, half copies of catalogue items: near and re-saved) and
   runs nightly again: embeds and matches only those;
4. a full recompute of the grown catalogue on a fresh state at the first run's threshold, for the clusters
   to compare with.
5. the night and the full recompute once more, each as its own `siamese-dedup nightly` process, as cron
   runs them (each imports Beam and TensorFlow first);
6. the night as the service runs it (`siamese-dedup nightly --serve_at 00:00`, on a copy of the state
   after step 2: it runs the missed night at its start, for today's date): the seconds from the service's
   "next night" line before the night to the one after it, after its one-off start-up.
Prints one JSON line: the seconds of each run and of each nightly step (of the last of --repeats runs of the
night), the ratio nightly (the median of those runs) / full (the second full run, of the same grown
catalogue), whether the clusters are identical, the same ratio of the two processes' wall times, and the
service's night / the in-process full recompute (whether its clusters are identical too).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _near_copy(img: np.ndarray, rng) -> np.ndarray:
    return np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)


def _write(path: str, img: np.ndarray, compress_level: int = 6) -> None:
    """A PNG; another compress_level writes the same pixels as other bytes (a re-saved copy)."""
    from PIL import Image
    Image.fromarray(img).save(path, compress_level=compress_level)


def _clusters(directory: str) -> set:
    import pyarrow.parquet as pq
    groups: dict = {}
    t = pq.read_table(os.path.join(directory, "clusters"), columns=["item_id", "cluster_id"])
    for item, cluster in zip(t.column("item_id").to_pylist(), t.column("cluster_id").to_pylist()):
        groups.setdefault(cluster, set()).add(item)
    return {frozenset(g) for g in groups.values()}


def main(argv=None) -> dict:
    from beam_pipeline import nightly
    from beam_pipeline import nightly_state as ns
    from trainer.data import load_fashion_mnist

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--new_share", type=float, default=0.01)
    parser.add_argument("--threshold", type=float, default=None,
                        help="Angular similarity threshold of every run (default: the first run self-calibrates "
                             "it, the nightly run keeps it from the state, the full recompute is given it).")
    parser.add_argument("--work", default="/tmp/bench_nightly")
    parser.add_argument("--repeats", type=int, default=3, help="Nightly runs of the same date; the median counts.")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    shutil.rmtree(args.work, ignore_errors=True)
    cat = os.path.join(args.work, "catalogue")
    os.makedirs(cat)
    images, _ = load_fashion_mnist("train")
    n_new = max(2, int(round(args.items * args.new_share)))
    order = rng.permutation(len(images))
    base, fresh = order[:args.items], order[args.items:args.items + n_new // 2]
    t = time.perf_counter()
    for k, i in enumerate(base):
        path = os.path.join(cat, f"item_{k:06d}.png")
        if k % 50 == 0:
            _write(path, _near_copy(images[base[k - 1]], rng))
        elif k % 50 == 25:
            _write(path, images[base[k - 1]], compress_level=1)
        else:
            _write(path, images[i])
    write_seconds = time.perf_counter() - t
    common = ["--catalogue", os.path.join(cat, "*.png"), "--model_dir", args.model_dir]
    given = [] if args.threshold is None else ["--threshold", str(args.threshold)]

    state = os.path.join(args.work, "state")
    t = time.perf_counter()
    first = nightly.run([*common, *given, "--state", state, "--run_date", "2026-12-01"])
    threshold = first["threshold"]["value"]
    first_seconds = time.perf_counter() - t
    service_state = os.path.join(args.work, "state_service")
    shutil.copytree(state, service_state)  # the state before the night, for the service's night (step 6)

    for k, i in enumerate(fresh):
        _write(os.path.join(cat, f"new_{k:06d}.png"), images[i])
    for k in range(n_new - len(fresh)):
        source = images[base[int(rng.integers(args.items))]]
        path = os.path.join(cat, f"copy_{k:06d}.png")
        if k % 2:
            _write(path, _near_copy(source, rng))
        else:
            _write(path, source, compress_level=1)
    # The night is run --repeats times (re-running a date starts again from the state before it, so each
    # does the same work): a run of a second is at the mercy of the machine's noise; the median is not.
    night_runs = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        night = nightly.run([*common, "--state", state, "--run_date", "2026-12-02"])
        night_runs.append(time.perf_counter() - t)
        assert night["counts"]["embedded"] == n_new and not night["full"], night["counts"]
    night_seconds = float(np.median(night_runs))

    fresh_state = os.path.join(args.work, "state_full")
    t = time.perf_counter()
    full = nightly.run([*common, "--threshold", repr(threshold), "--state", fresh_state, "--run_date", "2026-12-02"])
    full_seconds = time.perf_counter() - t
    same = _clusters(ns.current(state)["dir"]) == _clusters(ns.current(fresh_state)["dir"])
    # What a cron or systemd run sees: each run is a new `siamese-dedup nightly` process, which imports
    # Beam and TensorFlow (seconds) before any work. The night again (it replaces the date), and the full
    # recompute again on another fresh state.
    cli = [os.path.join(os.path.dirname(sys.executable), "siamese-dedup"), "nightly", *common]
    t = time.perf_counter()
    subprocess.run([*cli, "--state", state, "--run_date", "2026-12-02"], check=True, capture_output=True)
    night_process_seconds = time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([*cli, "--threshold", repr(threshold), "--state", os.path.join(args.work, "state_full_cli"),
                    "--run_date", "2026-12-02"], check=True, capture_output=True)
    full_process_seconds = time.perf_counter() - t
    service = _service_night([*cli, "--state", service_state, "--serve_at", "00:00"])
    service_same = _clusters(ns.current(service_state)["dir"]) == _clusters(ns.current(fresh_state)["dir"])
    assert service["summary"]["nights"][0]["full"] is False, service["summary"]
    result = {"bench": "nightly", "items": args.items, "new_items": n_new, "threshold": threshold,
              "threshold_how": first["threshold_how"], "write_catalogue_seconds": round(write_seconds, 1),
              "first_full_seconds": round(first_seconds, 1), "nightly_seconds": round(night_seconds, 2),
              "nightly_runs_seconds": [round(x, 2) for x in night_runs], "nightly_engine": night["engine"],
              "full_recompute_seconds": round(full_seconds, 1), "ratio": round(night_seconds / full_seconds, 4),
              "clusters_identical": same, "nightly_process_seconds": round(night_process_seconds, 2),
              "full_recompute_process_seconds": round(full_process_seconds, 1),
              "process_ratio": round(night_process_seconds / full_process_seconds, 4),
              "service_start_seconds": service["start_seconds"], "service_night_seconds": service["night_seconds"],
              "service_ratio": round(service["night_seconds"] / full_seconds, 4),
              "service_clusters_identical": service_same, "nightly_steps": night["seconds"], "full_steps": full["seconds"],
              "nightly_counts": night["counts"], "full_counts": full["counts"], "first_counts": first["counts"]}
    print(json.dumps(result), flush=True)
    return result


def _service_night(command: list[str]) -> dict:
    """Start the service, wait for its first night to end, stop it with SIGTERM: {"start_seconds": from the
    start to the night's start, "night_seconds": the night, "summary": the service's summary}."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waits = []  # when the service said "next night": before the night, and after it

    def read():
        for line in proc.stderr:
            if "next night" in line:
                waits.append(time.perf_counter())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while len(waits) < 2 and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is not None:
        raise RuntimeError(f"the service ended by itself (exit {proc.returncode}): see its log")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    summary = json.loads(proc.stdout.read())
    return {"start_seconds": round(waits[0] - started, 2), "night_seconds": round(waits[1] - waits[0], 2),
            "summary": summary}


if __name__ == "__main__":
    main()
