"""The `siamese-dedup` command end to end on a tiny catalogue, checked against an independent reference:
the model's own predictions, brute-force pairs and scipy's connected components."""
import csv
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from beam_pipeline import cli
from beam_pipeline.demo import write_catalogue
from schemas import validate_report

STAGE_FLAGS = {
    "train": ["--output", "--epochs", "--margin"],
    "embed": ["--input", "--model_dir", "--batch_size"],
    "match": ["--templates", "--threshold", "--target_fmr"],
    "dedup": ["--matches", "--keeper_policy"],
    "report": ["--workdir", "--ground_truth"],
    "demo": ["--output", "--planted"],
}


@pytest.mark.parametrize("stage", sorted(STAGE_FLAGS))
def test_every_subcommand_has_a_useful_help(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([stage, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in STAGE_FLAGS[stage]:
        assert flag in text, f"{stage} --help does not mention {flag}"


def test_unknown_stage_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2


def _reference_embeddings(model_dir, image_dir, item_ids):
    from siamese_core.decode import decode_image
    from beam_pipeline.inference import embed_batch
    from siamese_core.artefact import load_encoder

    model, card = load_encoder(model_dir)
    pixels = []
    for item in item_ids:
        with open(os.path.join(image_dir, item), "rb") as f:
            pixels.append(decode_image(f.read(), card["input_spec"]).pixels)
    return embed_batch(model, np.stack(pixels), card["input_spec"])


def _threshold_in_a_gap(similarities, quantile=0.97):
    """A threshold with no similarity within 1e-4 of it, so float rounding cannot flip a pair."""
    values = np.unique(similarities)
    start = int(quantile * len(values))
    for low, high in zip(values[start:], values[start + 1:]):
        if high - low > 2e-4:
            return float((low + high) / 2)
    raise AssertionError("no gap found")


def test_stages_end_to_end_match_an_independent_reference(tiny_model_dir, tmp_path):
    import pyarrow.parquet as pq
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from siamese_core.similarity import angular_similarity

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(24, 28, 28), dtype=np.uint8)
    images[:, 8:20, 8:20] = 0  # a shared motif, so some distinct images are close too
    catalogue = write_catalogue(images, np.arange(24) % 3, str(tmp_path / "cat"), planted=5, seed=1)
    work = str(tmp_path / "work")
    image_dir = os.path.dirname(catalogue.image_glob)

    cli.main(["embed", "--input", catalogue.image_glob, "--model_dir", tiny_model_dir, "--output", work,
              "--run_id", "r1"])
    templates = pq.read_table(glob.glob(f"{work}/templates/*.parquet")).sort_by("item_id")
    failures = pq.read_table(glob.glob(f"{work}/failures/*.parquet"))
    assert templates.num_rows == catalogue.items - catalogue.broken_items
    assert failures.num_rows == catalogue.broken_items == 3
    assert set(failures.column("stage").to_pylist()) == {"decode"}

    ids = templates.column("item_id").to_pylist()
    emb = _reference_embeddings(tiny_model_dir, image_dir, ids)
    sims = angular_similarity(emb @ emb.T)
    upper = np.triu_indices(len(ids), k=1)
    threshold = _threshold_in_a_gap(sims[upper])
    expected_pairs = {(ids[i], ids[j]) for i, j in zip(*upper) if sims[i, j] >= threshold}
    assert expected_pairs, "the reference has no pair above the threshold: the test would prove nothing"

    cli.main(["match", "--templates", f"{work}/templates/*.parquet", "--output", work,
              "--threshold", str(threshold), "--run_id", "r1"])
    matches = pq.read_table(glob.glob(f"{work}/matches/*.parquet"))
    assert set(zip(matches.column("left_id").to_pylist(), matches.column("right_id").to_pylist())) == expected_pairs

    cli.main(["dedup", "--templates", f"{work}/templates/*.parquet", "--matches", f"{work}/matches/*.parquet",
              "--output", work, "--linkage", "single", "--run_id", "r1"])
    clusters = pq.read_table(glob.glob(f"{work}/clusters/*.parquet")).to_pylist()
    index = {item: k for k, item in enumerate(ids)}
    rows = [index[a] for a, _ in expected_pairs]
    cols = [index[b] for _, b in expected_pairs]
    n_components, labels = connected_components(
        coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ids), len(ids))), directed=False
    )
    expected_keeper = {}
    for k, item in enumerate(ids):
        expected_keeper.setdefault(labels[k], item)  # ids are sorted: the first is the smallest
    by_item = {row["item_id"]: row for row in clusters}
    assert set(by_item) == set(ids)
    for k, item in enumerate(ids):
        assert by_item[item]["keeper_id"] == expected_keeper[labels[k]]
        assert by_item[item]["is_keeper"] == (item == expected_keeper[labels[k]])

    with open(catalogue.ground_truth_csv) as f:
        planted = {tuple(row) for row in list(csv.reader(f))[1:]}
    cli.main(["report", "--workdir", work, "--ground_truth", catalogue.ground_truth_csv])
    with open(os.path.join(work, "report.json")) as f:
        report = validate_report(json.load(f))
    core_counts = {k: report["counts"][k] for k in ("items", "failures", "pairs", "clusters", "items_to_drop")}
    assert core_counts == {
        "items": len(ids), "failures": 3, "pairs": len(expected_pairs),
        "clusters": int(sum(np.bincount(labels) > 1)), "items_to_drop": len(ids) - n_components,
    }
    same_cluster = {(a, b) for a, b in planted if by_item[a]["cluster_id"] == by_item[b]["cluster_id"]}
    assert report["evaluation"]["recall"] == pytest.approx(len(same_cluster) / len(planted))
    assert os.path.getsize(os.path.join(work, "report.html")) > 1000


def test_a_user_mistake_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    code = cli.main(["match", "--templates", str(tmp_path / "none" / "*.parquet"), "--output", str(tmp_path),
                     "--threshold", "0.9", "--target_fmr", "1e-4"])
    err = capsys.readouterr().err
    assert code == 2 and "error: give at most one of --threshold" in err and "Traceback" not in err
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="at most one"):
        cli.main(["match", "--templates", "x", "--output", str(tmp_path), "--threshold", "0.9",
                  "--target_fmr", "1e-4"])


HUNG_STAGE = '''
import os, signal, threading, time

def run(argv):
    # Like a Beam worker left behind by an interrupted pipeline: a non-daemon thread nobody will wake.
    threading.Thread(target=threading.Event().wait, daemon=False).start()
    try:
        open(os.environ["STAGE_READY"], "w").close()
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        if argv == ["--stop_quietly"]:  # as `watch` does: Ctrl-C is its way to stop
            return {"stopped": "interrupted"}
        raise
'''


@pytest.mark.parametrize("how", ["raises", "stops_quietly"])
def test_ctrl_c_ends_the_command_even_with_a_thread_left_waiting(tmp_path, how):
    """The command exits after a Ctrl-C although a non-daemon thread of the stage still waits (Python
    would otherwise wait for it at exit: CI saw `embed` hang after printing that it was interrupted)."""
    (tmp_path / "hung_stage.py").write_text(HUNG_STAGE)
    ready = tmp_path / "ready"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = ["siamese-dedup", "hung"] + (["--stop_quietly"] if how == "stops_quietly" else [])
    program = ("import sys; from beam_pipeline import cli; cli.STAGES['hung'] = ('hung_stage', 'a test stage'); "
               f"sys.argv = {argv!r}; cli.console_main()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root]), "STAGE_READY": str(ready)}
    proc = subprocess.Popen([sys.executable, "-c", program], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the command did not exit after Ctrl-C")
    if how == "raises":
        assert proc.returncode == cli.EXIT_INTERRUPTED and "interrupted: nothing was published" in err
    else:
        assert proc.returncode == 0 and json.loads(out) == {"stopped": "interrupted"}


@pytest.mark.parametrize("signum", cli.STOP_SIGNALS)
def test_sigint_and_sigterm_stop_a_run_as_ctrl_c_does(signum):
    """SIGTERM (docker stop, Kubernetes, systemd) raises KeyboardInterrupt like Ctrl-C, so staging areas are
    removed and locks released on the way out; the handlers before are restored afterwards."""
    before = {s: signal.getsignal(s) for s in cli.STOP_SIGNALS}
    interrupted = []
    with pytest.raises(KeyboardInterrupt):
        with cli.noting_interrupts(interrupted):
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler raises at once (Python runs it between this thread's bytecodes)
    assert interrupted == [signal.Signals(signum).name]
    assert {s: signal.getsignal(s) for s in cli.STOP_SIGNALS} == before


def test_an_interrupt_is_noted_by_every_enclosing_watcher():
    """A stage that watches for its own interruption (nightly --serve_at, watch) inside the command's: both
    lists get the entry, so the command still knows to exit at once."""
    outer, inner = [], []
    with pytest.raises(KeyboardInterrupt):
        with cli.noting_interrupts(outer):
            with cli.noting_interrupts(inner):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
    assert inner == outer == ["SIGTERM"]


def test_an_error_after_a_stop_leaves_as_the_stop():
    """Beam re-raises a KeyboardInterrupt inside a transform as a RuntimeError: after a stop signal, an error
    leaving the block is the stop (a KeyboardInterrupt from it); without one, errors pass unchanged."""
    interrupted = []
    with pytest.raises(KeyboardInterrupt) as stop:
        with cli.noting_interrupts(interrupted):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                raise RuntimeError("KeyboardInterrupt [while running 'Embed']") from None
    assert isinstance(stop.value.__cause__, RuntimeError) and interrupted == ["SIGTERM"]
    with pytest.raises(RuntimeError, match="a bug"):
        with cli.noting_interrupts([]):
            raise RuntimeError("a bug")
