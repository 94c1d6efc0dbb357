"""The streaming watcher (beam_pipeline.streaming): new files are reported with their duplicates in the
indexed catalogue, failures are rows, and the latency from a file written to its row is measured.

The index is a small catalogue embedded by the embed stage itself; the planted duplicate is a byte copy
of an indexed item under another name (the untrained tiny encoder checks plumbing, not quality), the
distinct image is noise, which scores well below the threshold against the catalogue's smooth patterns.
"""
from __future__ import annotations

import io
import json
import os
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("keras")

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing import test_stream
from apache_beam.transforms.window import TimestampedValue

from beam_pipeline import cli, embed, streaming
from beam_pipeline.inference import EncoderChunkHandler
from beam_pipeline.options import WatchOptions

THRESHOLD = 0.99
CATALOGUE = 6
MAX_LATENCY_SECONDS = 60.0


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _pattern(k: int) -> np.ndarray:
    """A smooth 28x28 pattern, different for each k."""
    yy, xx = np.mgrid[0:28, 0:28]
    return ((np.sin(xx * (k + 1) / 5.0) + np.cos(yy * (6 - k) / 4.0)) * 60 + 128).astype(np.uint8)


def _noise(seed: int) -> bytes:
    return _png(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))


def _drop(folder: str, name: str, data: bytes) -> float:
    """Write `name` into `folder` whole (written beside it, renamed into place); the time it appeared."""
    tmp = os.path.join(os.path.dirname(folder.rstrip("/")), f".{name}.part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(folder, name))
    return time.time()


@pytest.fixture(scope="module")
def index(tmp_path_factory, tiny_model_dir):
    """The catalogue embedded by the embed stage: {"templates": glob, "files": {name: bytes}, "model_dir"}."""
    root = tmp_path_factory.mktemp("watch_index")
    catalogue = root / "catalogue"
    catalogue.mkdir()
    files = {f"item_{k}.png": _png(_pattern(k)) for k in range(CATALOGUE)}
    for name, data in files.items():
        (catalogue / name).write_bytes(data)
    summary = embed.run(["--input", str(catalogue / "*.png"), "--model_dir", tiny_model_dir,
                         "--output", str(root / "work")])
    assert summary["embedded"] == CATALOGUE
    return {"templates": str(root / "work" / "templates" / "templates-*.parquet"), "files": files,
            "model_dir": tiny_model_dir}


def _rows(output: str) -> dict:
    return {kind: streaming.read_rows(output, kind) for kind in streaming.KINDS}


def test_match_against_index_is_exact_and_skips_the_item_itself():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = streaming.CatalogueIndex([f"c{k}" for k in range(5)], [f"/c{k}" for k in range(5)], emb, "m")
    queries = np.stack([emb[2], emb[4]])
    cos = queries @ emb.T
    threshold = float(np.sort(cos[0])[-2])  # exactly the second-best similarity of the first query
    found = streaming.match_against_index(queries, ["new", "c4"], index, threshold)
    pairs, nearest, nearest_cos = found[0]
    assert [j for j, _ in pairs] == [2, int(np.argsort(cos[0])[-2])]  # best first, the one at the threshold kept
    assert nearest == 2 and nearest_cos == pytest.approx(1.0, abs=1e-6)
    pairs, nearest, _ = found[1]  # "c4" is the indexed item itself: not its own duplicate
    assert 4 not in [j for j, _ in pairs] and nearest != 4


def test_new_files_are_those_written_since_the_start_and_not_the_watchers_own():
    from apache_beam.io.filesystem import FileMetadata

    def listed(path, modified):
        return FileMetadata(path, 10, last_updated_in_seconds=modified)

    assert streaming.is_new(listed("/drop/a.png", 100.0), 100.0, "/out")
    assert not streaming.is_new(listed("/drop/a.png", 99.0), 100.0, "/out")  # there before: not new
    assert streaming.is_new(listed("/drop/a.png", 99.0), 0.0, "/out")  # --include_existing
    assert not streaming.is_new(listed("/drop/out/checked/x.jsonl", 200.0), 100.0, "/drop/out/")
    assert not streaming.is_new(listed("gs://b/drop/folder/", 200.0), 100.0, "gs://b/out")


def test_test_stream_reports_the_copy_not_the_distinct_image_and_the_corrupt_file(index, tmp_path):
    """TestStream -> FindDuplicates -> WriteRows: the steps after MatchContinuously, on the streaming
    DirectRunner, with the file paths arriving at their own event times."""
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "copy.png").write_bytes(index["files"]["item_3.png"])
    (drop / "distinct.png").write_bytes(_noise(1))
    (drop / "corrupt.png").write_bytes(index["files"]["item_1.png"][:40])
    out = str(tmp_path / "out")
    glob = str(drop / "*.png")
    handler = EncoderChunkHandler(index["model_dir"], batch_size=8)
    threshold = streaming.resolve_index(PipelineOptions(
        ["--templates", index["templates"], "--threshold", str(THRESHOLD)]).view_as(WatchOptions))[1]
    now = time.time()
    stream = (test_stream.TestStream()
              .add_elements([TimestampedValue(str(drop / "copy.png"), now)])
              .advance_watermark_to(now + 1)
              .add_elements([TimestampedValue(str(drop / "distinct.png"), now + 2),
                             TimestampedValue(str(drop / "corrupt.png"), now + 2)])
              .advance_watermark_to(now + 3)
              .add_elements([TimestampedValue(str(drop / "gone.png"), now + 4)])  # listed, then deleted
              .advance_watermark_to_infinity())
    options = PipelineOptions(["--runner", "BundleBasedDirectRunner", "--streaming"])
    with beam.Pipeline(options=options) as p:
        rows = (p | stream | streaming.FindDuplicates(glob, handler, index["templates"], threshold, "run-ts",
                                                      max_pixels=10_000_000, max_file_bytes=0))
        _ = rows | streaming.WriteRows(out, "run-ts")
    found = _rows(out)
    assert [(r["item_id"], r["catalogue_item_id"]) for r in found["duplicates"]] == [("copy.png", "item_3.png")]
    dup = found["duplicates"][0]
    assert dup["angular_similarity"] == pytest.approx(1.0, abs=1e-6) and dup["threshold"] == THRESHOLD
    assert dup["source_uri"] == str(drop / "copy.png") and dup["catalogue_source_uri"].endswith("item_3.png")
    checked = {r["item_id"]: r for r in found["checked"]}
    assert set(checked) == {"copy.png", "distinct.png"}
    assert checked["copy.png"]["duplicates"] == 1
    assert checked["distinct.png"]["duplicates"] == 0
    assert checked["distinct.png"]["nearest_angular_similarity"] < THRESHOLD
    failures = {r["item_id"]: r for r in found["failures"]}
    assert set(failures) == {"corrupt.png", "gone.png"}  # never silently dropped
    assert failures["corrupt.png"]["stage"] == "decode" and failures["corrupt.png"]["error"].startswith("DecodeError")
    assert failures["gone.png"]["stage"] == "read"
    for row in found["duplicates"] + found["checked"] + found["failures"]:
        assert row["run_id"] == "run-ts" and row["reported_at"] >= row["seen_at"]


@pytest.fixture(scope="module")
def watched(index, tmp_path_factory):
    """`siamese-dedup watch` run on a local folder (MatchContinuously on the local runner) for a bounded time,
    while files are dropped into it: {"summary", "output", "written": {name: time it appeared}}."""
    root = tmp_path_factory.mktemp("watched")
    drop = root / "drop"
    drop.mkdir()
    old = drop / "old_copy.png"  # there before the watcher started: not new
    old.write_bytes(index["files"]["item_0.png"])
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    output = str(root / "out")
    argv = ["--input", str(drop / "*.png"), "--model_dir", index["model_dir"], "--templates", index["templates"],
            "--threshold", str(THRESHOLD), "--output", output, "--poll_interval", "0.5",
            "--stop_after_seconds", "15", "--run_id", "run-watch"]
    result = {}

    def watch():
        try:
            result["summary"] = streaming.run(argv)
        except BaseException as err:  # re-raised in the test's thread
            result["error"] = err

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    time.sleep(2.0)
    written = {}
    for name, data in [("copy_of_2.png", index["files"]["item_2.png"]), ("distinct.png", _noise(2)),
                       ("copy_of_5.png", index["files"]["item_5.png"]), ("broken.png", b"not an image")]:
        written[name] = _drop(str(drop), name, data)
        time.sleep(1.0)
    thread.join(timeout=120)
    assert not thread.is_alive(), "the watcher did not stop after --stop_after_seconds"
    if "error" in result:
        raise result["error"]
    return {"summary": result["summary"], "output": output, "written": written}


def test_watched_folder_reports_the_duplicates_of_files_dropped_into_it(watched):
    found = _rows(watched["output"])
    assert sorted((r["item_id"], r["catalogue_item_id"]) for r in found["duplicates"]) == [
        ("copy_of_2.png", "item_2.png"), ("copy_of_5.png", "item_5.png")]
    assert sorted(r["item_id"] for r in found["checked"]) == ["copy_of_2.png", "copy_of_5.png", "distinct.png"]
    assert [(r["item_id"], r["stage"]) for r in found["failures"]] == [("broken.png", "decode")]
    summary = watched["summary"]
    assert summary["counts"] == {"duplicates": 2, "failures": 1, "checked": 3}
    assert summary["index_items"] == CATALOGUE and summary["threshold"]["source"] == "given"
    assert summary["counters"]["existing_skipped"] >= 1  # old_copy.png: before the watcher started
    assert summary["counters"]["files_seen"] == 4  # each file once, however many polls listed it
    assert 14 <= summary["seconds"] < 60  # --stop_after_seconds 15 was kept


def test_latency_from_written_to_reported_is_under_a_minute(watched):
    found = _rows(watched["output"])
    reported = {}
    for row in found["checked"] + found["failures"]:
        reported[row["item_id"]] = streaming.parse_time(row["reported_at"])
    latency = {name: reported[name] - at for name, at in watched["written"].items()}
    print("latency (s):", json.dumps({k: round(v, 3) for k, v in latency.items()}))
    assert set(latency) == set(watched["written"])
    assert all(0 <= v < MAX_LATENCY_SECONDS for v in latency.values()), latency


def test_state_gives_the_index_and_its_threshold(index, tmp_path):
    from beam_pipeline import nightly_state

    state = tmp_path / "state"
    gen = state / "generations" / "g1"
    (gen / "templates").mkdir(parents=True)
    for path in streaming.bio.match_paths(index["templates"]):
        (gen / "templates" / os.path.basename(path)).write_bytes(open(path, "rb").read())
    (gen / "state.json").write_text(json.dumps({"generation": "g1", "threshold": {
        "value": 0.97, "score": "angular_similarity", "angular_similarity": 0.97, "source": "self_calibrated"}}))
    nightly_state.commit(str(state), "g1")

    def resolve(*flags):
        return streaming.resolve_index(PipelineOptions(list(flags)).view_as(WatchOptions))

    glob, threshold = resolve("--state", str(state))
    assert glob == nightly_state.current_templates_glob(str(state))
    assert threshold["value"] == 0.97 and "self_calibrated" in threshold["source"]
    assert len(streaming.load_index(glob, EncoderChunkHandler(index["model_dir"]).model_id, 8)) == CATALOGUE
    assert resolve("--state", str(state), "--threshold", "0.95")[1]["value"] == 0.95
    with pytest.raises(ValueError, match="one of --state"):
        resolve("--state", str(state), "--templates", index["templates"])
    with pytest.raises(ValueError, match="needs --threshold"):
        resolve("--templates", index["templates"])
    with pytest.raises(FileNotFoundError, match="no committed generation"):
        resolve("--state", str(tmp_path / "empty"))


def test_index_of_another_model_is_refused(index):
    with pytest.raises(ValueError, match="different encoders"):
        streaming.load_index(index["templates"], "another-model", 8)


def test_cli_watch_refuses_a_missing_index_in_one_line(index, tmp_path, capsys):
    code = cli.main(["watch", "--input", str(tmp_path / "*.png"), "--model_dir", index["model_dir"],
                     "--output", str(tmp_path / "out")])
    assert code == 2
    assert "one of --state" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["watch", "--help"])
    assert exit_info.value.code == 0
    assert "--poll_interval" in capsys.readouterr().out
