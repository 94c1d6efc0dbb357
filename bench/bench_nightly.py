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
6. the nights as the service runs them: `siamese-dedup nightly --serve_at 00:00` in a process of its own,
   on a copy of the state after step 2, for --service_nights nights. Its first night is the missed one, run
   at its start (the same 500 new files as step 3); before each later night another new_share x ITEMS files
   arrive. The service's clock is the only thing not real: the process jumps to the next night's hour
   instead of sleeping (`nightly_schedule.serve`'s clock and sleep, as the tests drive it), so its nights
   come seconds apart, not a day (the machine's caches stay warm between them). Then a full recompute of the
   final catalogue on a fresh state, for the clusters to compare with the service's.
Prints one JSON line: the seconds of each run and of each nightly step (of the last of --repeats runs of the
night), the ratio nightly (the median of those runs) / full (the second full run, of the same grown
catalogue), whether the clusters are identical, the same ratio of the two processes' wall times, and the
service's start and nights, its first night and its later nights (median) / the in-process full recompute of
step 4 (a smaller catalogue than the later nights': the ratio errs high), the later nights / the final full
recompute (the last night's catalogue, and measured right after the service: the machine's speed drifts over
the bench's ten minutes), and whether the service's final clusters are the final full recompute's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

_STARTED = time.perf_counter()  # the service's process (step 6) counts its start from here

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
    parser.add_argument("--service_nights", type=int, default=3, help="Nights the service runs (step 6), >= 2.")
    args = parser.parse_args(argv)
    if args.service_nights < 2:
        parser.error("--service_nights is at least 2: the first night and a later one")
    rng = np.random.default_rng(0)
    shutil.rmtree(args.work, ignore_errors=True)
    cat = os.path.join(args.work, "catalogue")
    os.makedirs(cat)
    images, _ = load_fashion_mnist("train")
    n_new = max(2, int(round(args.items * args.new_share)))
    order = rng.permutation(len(images))
    base = order[:args.items]
    if args.items + args.service_nights * (n_new // 2) > len(images):
        parser.error(f"--items {args.items} leaves too few unused images for {args.service_nights} nights of new items")
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

    def new_items(directory: str, day: int) -> None:
        """new_share x ITEMS files of day `day` into `directory`: half new images, half copies of catalogue
        items (near and re-saved)."""
        start = args.items + day * (n_new // 2)
        for k, i in enumerate(order[start:start + n_new // 2]):
            _write(os.path.join(directory, f"new{day}_{k:06d}.png"), images[i])
        for k in range(n_new - n_new // 2):
            source = images[base[int(rng.integers(args.items))]]
            path = os.path.join(directory, f"copy{day}_{k:06d}.png")
            if k % 2:
                _write(path, _near_copy(source, rng))
            else:
                _write(path, source, compress_level=1)

    new_items(cat, 0)
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
    arrivals = []  # the files of the service's later nights, written now: the service only moves them in
    for day in range(1, args.service_nights):
        arrivals.append(os.path.join(args.work, f"arrivals_{day}"))
        os.makedirs(arrivals[-1])
        new_items(arrivals[-1], day)
    service = _service_nights(["nightly", *common, "--state", service_state, "--serve_at", "00:00"], cat, arrivals)
    assert [n["embedded"] for n in service["nights"]] == [n_new] * args.service_nights, service["nights"]
    t = time.perf_counter()
    final_state = os.path.join(args.work, "state_full_final")
    final = nightly.run([*common, "--threshold", repr(threshold), "--state", final_state, "--run_date", "2026-12-02"])
    final_seconds = time.perf_counter() - t
    service_same = _clusters(ns.current(service_state)["dir"]) == _clusters(ns.current(final_state)["dir"])
    later = float(np.median([n["seconds"] for n in service["nights"][1:]]))
    result = {"bench": "nightly", "items": args.items, "new_items": n_new, "threshold": threshold,
              "threshold_how": first["threshold_how"], "write_catalogue_seconds": round(write_seconds, 1),
              "first_full_seconds": round(first_seconds, 1), "nightly_seconds": round(night_seconds, 2),
              "nightly_runs_seconds": [round(x, 2) for x in night_runs], "nightly_engine": night["engine"],
              "full_recompute_seconds": round(full_seconds, 1), "ratio": round(night_seconds / full_seconds, 4),
              "clusters_identical": same, "nightly_process_seconds": round(night_process_seconds, 2),
              "full_recompute_process_seconds": round(full_process_seconds, 1),
              "process_ratio": round(night_process_seconds / full_process_seconds, 4),
              "service_start_seconds": service["start_seconds"], "service_nights": service["nights"],
              "service_first_night_ratio": round(service["nights"][0]["seconds"] / full_seconds, 4),
              "service_later_nights_seconds": round(later, 2), "service_later_nights_ratio": round(later / full_seconds, 4),
              "service_final_items": final["counts"]["items"], "service_final_full_seconds": round(final_seconds, 1),
              "service_later_nights_ratio_final_full": round(later / final_seconds, 4),
              "service_clusters_identical": service_same, "nightly_steps": night["seconds"], "full_steps": full["seconds"],
              "nightly_counts": night["counts"], "full_counts": full["counts"], "first_counts": first["counts"]}
    print(json.dumps(result), flush=True)
    return result


def _service_nights(nightly_args: list[str], catalogue_dir: str, arrivals: list[str]) -> dict:
    """Run the service (`siamese-dedup nightly ... --serve_at`) in a new process (`_serve_child`) for
    1 + len(arrivals) nights: {"start_seconds": from the process's start to its first night,
    "nights": [{"run_date", "seconds" (the night's wall time), "embedded", "full"}, ...]}."""
    spec = json.dumps({"nightly_args": nightly_args, "catalogue_dir": catalogue_dir, "arrivals": arrivals})
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--serve_child", spec], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the service's process failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _serve_child(spec: dict) -> None:
    """The service's process (step 6): `beam_pipeline.cli`'s nightly with --serve_at, as the console script
    runs it, on a clock that does not wait. Before each later night the next arrivals directory's files
    move into the catalogue; after the last night the service is stopped as by SIGTERM."""
    import datetime
    import functools

    from beam_pipeline import cli, nightly_schedule

    now = [datetime.datetime.now(datetime.timezone.utc)]
    arrivals = list(spec["arrivals"])
    nights = []
    night_starts: list[float] = []  # the first ends the service's start

    def sleep(seconds: float) -> None:  # the service waits for the next night: the time passes at once
        if len(nights) == 1 + len(spec["arrivals"]):
            raise KeyboardInterrupt  # what SIGTERM raises in the service (beam_pipeline.cli.STOP_SIGNALS)
        now[0] += datetime.timedelta(seconds=seconds)

    def timed(run_night, run_date: str) -> dict:
        if nights:  # the day's new files, in the catalogue before its night
            directory = arrivals.pop(0)
            for name in sorted(os.listdir(directory)):
                os.rename(os.path.join(directory, name), os.path.join(spec["catalogue_dir"], name))
        t = time.perf_counter()
        night_starts.append(t)
        manifest = run_night(run_date)
        nights.append({"run_date": run_date, "seconds": round(time.perf_counter() - t, 3),
                       "embedded": manifest["counts"]["embedded"], "full": manifest["full"],
                       "steps": manifest["seconds"]})
        return manifest

    real_serve = nightly_schedule.serve
    nightly_schedule.serve = lambda run_night, at, last_run_date: real_serve(
        functools.partial(timed, run_night), at, last_run_date, clock=lambda: now[0], sleep=sleep)
    status = cli.main(spec["nightly_args"])
    if status != 0 or len(nights) != 1 + len(spec["arrivals"]):
        raise SystemExit(f"the service ended with status {status} after {len(nights)} nights")
    print(json.dumps({"start_seconds": round(night_starts[0] - _STARTED, 2), "nights": nights}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve_child":
        _serve_child(json.loads(sys.argv[2]))
    else:
        main()
