"""siamese-dedup nightly: after any sequence of runs the clusters equal a full recompute's; re-running a date
replaces it; a run killed at any step leaves the state usable; a new model re-embeds everything; two runs
cannot hold the state at once."""
import datetime
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_pipeline import cli, dedup, embed, match, nightly, nightly_schedule
from beam_pipeline import nightly_state as ns

THRESHOLD = 0.98


def _image(seed: int, noise: int = 0) -> np.ndarray:
    """A 28x28 pattern of `seed`; with `noise` a near copy of it (another seed of noise)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (7, 7)).repeat(4, 0).repeat(4, 1).astype(np.int16)
    if noise:
        base = base + np.random.default_rng(1000 + noise).integers(-3, 4, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def _write(cat, name, pixels):
    Image.fromarray(pixels).save(os.path.join(cat, name))


def _clusters(directory: str) -> tuple[set, dict]:
    """(the clusters as frozensets of item ids, {cluster member: keeper}) of a clusters table."""
    t = pq.read_table(os.path.join(directory, "clusters")).to_pylist()
    groups: dict = {}
    keeper = {}
    for r in t:
        groups.setdefault(r["cluster_id"], set()).add(r["item_id"])
        if r["is_keeper"]:
            keeper[r["cluster_id"]] = r["item_id"]
    return {frozenset(g) for g in groups.values()}, {frozenset(g): keeper[c] for c, g in groups.items()}


def _full_recompute(cat, model, out, dedup_flags=()):
    glob = os.path.join(cat, "*.png")
    embed.run(["--input", glob, "--model_dir", model, "--output", out])
    match.run(["--templates", os.path.join(out, "templates", "*.parquet"), "--output", out,
               "--threshold", str(THRESHOLD), "--score_norm", "none"])
    dedup.run(["--templates", os.path.join(out, "templates", "*.parquet"),
               "--matches", os.path.join(out, "matches", "*.parquet"), "--output", out, *dedup_flags])
    return _clusters(out)


def _nightly(cat, model, state, date, *extra):
    return nightly.run(["--catalogue", os.path.join(cat, "*.png"), "--model_dir", model, "--state", state,
                        "--run_date", date, "--threshold", str(THRESHOLD), *extra])


def _state_clusters(state):
    return _clusters(ns.current(state)["dir"])


def _mutate(cat, rng, step):
    """A random night: add fresh images and near copies, change some files' bytes, remove some."""
    names = sorted(os.listdir(cat))
    for k in range(int(rng.integers(1, 4))):  # fresh items
        _write(cat, f"n{step}_{k}.png", _image(int(rng.integers(10_000, 20_000))))
    for k in range(int(rng.integers(1, 4))):  # near copies of existing items
        source = names[int(rng.integers(len(names)))]
        pixels = np.asarray(Image.open(os.path.join(cat, source)))
        noisy = np.clip(pixels.astype(np.int16) + np.random.default_rng(step * 10 + k).integers(-3, 4, pixels.shape),
                        0, 255).astype(np.uint8)
        _write(cat, f"c{step}_{k}.png", noisy)
    for name in rng.choice(names, size=min(2, len(names)), replace=False):  # changed bytes
        _write(cat, name, _image(int(rng.integers(20_000, 30_000)), noise=int(rng.integers(1, 9))))
    for name in rng.choice(sorted(os.listdir(cat)), size=2, replace=False):  # removed
        os.remove(os.path.join(cat, name))


def _catalogue(tmp_path, n_groups=8):
    cat = str(tmp_path / "cat")
    os.makedirs(cat)
    for g in range(n_groups):
        _write(cat, f"g{g}_0.png", _image(g))
        if g % 2 == 0:
            _write(cat, f"g{g}_1.png", _image(g, noise=g + 1))
    return cat


def _generation_rows(state: str, name: str) -> list:
    """The committed generation's `name` table as sorted rows, run ids aside."""
    rows = pq.read_table(os.path.join(ns.current(state)["dir"], name)).drop_columns(["run_id"]).to_pylist()
    return sorted(rows, key=lambda r: tuple(str(v) for v in r.values()))


@pytest.mark.parametrize("seed,policy", [(0, ["--linkage", "complete"]),
                                         (1, ["--linkage", "single", "--keeper_policy", "largest_image"])])
def test_nightly_sequence_equals_full_recompute(tmp_path, tiny_model_dir, seed, policy):
    """Each night runs on two states, one in this process (--engine auto: local for these small nights)
    and one through the pipelines (--engine beam): the same tables every night, and at the end the
    clusters of a full recompute."""
    cat = _catalogue(tmp_path)
    state, piped = str(tmp_path / "state"), str(tmp_path / "state_beam")
    rng = np.random.default_rng(seed)
    first = _nightly(cat, tiny_model_dir, state, "2026-12-01", *policy)
    _nightly(cat, tiny_model_dir, piped, "2026-12-01", *policy)
    assert first["full"] and first["counts"]["added"] == first["counts"]["items"] and first["engine"] == "beam"
    assert first["counts"]["clusters"] >= 3  # the near copies cluster
    for day, date in enumerate(["2026-12-02", "2026-12-03", "2026-12-04"], 1):
        _mutate(cat, rng, day)
        manifest = _nightly(cat, tiny_model_dir, state, date, *policy)
        beam_manifest = _nightly(cat, tiny_model_dir, piped, date, *policy, "--engine", "beam")
        assert not manifest["full"] and manifest["engine"] == "local" and beam_manifest["engine"] == "beam"
        c = manifest["counts"]
        assert c["embedded"] == c["added"] + c["changed"] and c["templates"] == c["items"]
        assert c["reclustered_items"] < c["templates"]  # only the components the night touched
        assert beam_manifest["counts"]["reclustered_items"] == c["templates"]
        assert manifest["threshold"]["value"] == THRESHOLD and "kept from the state" in manifest["threshold_how"]
        for table in ("templates", "failures", "matches", "clusters"):
            local_rows, beam_rows = _generation_rows(state, table), _generation_rows(piped, table)
            if table == "templates":  # each engine embedded tonight's items at its own time
                local_rows, beam_rows = ([{k: v for k, v in r.items() if k not in ("embedded_at", "embedding")}
                                          for r in rows] for rows in (local_rows, beam_rows))
            assert local_rows == beam_rows, (date, table)
    got, got_keepers = _state_clusters(state)
    want, want_keepers = _full_recompute(cat, tiny_model_dir, str(tmp_path / "full"), policy)
    assert got == want and got_keepers == want_keepers
    assert any(len(g) > 1 for g in want)
    on_disk = json.load(open(os.path.join(state, "runs", "2026-12-04", "manifest.json")))
    assert on_disk["generation"] == ns.current_name(state)


@pytest.mark.parametrize("engine", ["auto", "beam"])  # auto: these small nights run in process
def test_rerun_of_a_date_replaces_it_and_a_killed_run_leaves_the_state(tmp_path, tiny_model_dir, monkeypatch,
                                                                      engine):
    cat = _catalogue(tmp_path, n_groups=6)
    state = str(tmp_path / "state")

    def night(date):  # every run of this test on `engine`
        return _nightly(cat, tiny_model_dir, state, date, "--engine", engine)

    night("2026-12-01")
    _write(cat, "late.png", _image(3, noise=5))  # a copy of g3_0
    day2 = night("2026-12-02")
    assert day2["counts"]["added"] == 1 and day2["engine"] == {"auto": "local", "beam": "beam"}[engine]
    # The date again, after another file arrived: starts from 12-01's state, replaces 12-02's outputs.
    _write(cat, "later.png", _image(40))
    again = night("2026-12-02")
    assert again["replaced_date"] and again["counts"]["added"] == 2 and again["parent"] == day2["parent"]
    assert json.load(open(os.path.join(state, "runs", "2026-12-02", "manifest.json")))["run_id"] == again["run_id"]
    assert _state_clusters(state)[0] == _full_recompute(cat, tiny_model_dir, str(tmp_path / "full"))[0]
    with pytest.raises(ValueError, match="runs go forward"):
        night("2026-11-30")

    # Killed after each step: CURRENT and the date's outputs stay as they were; nothing is left locked.
    os.remove(os.path.join(cat, "g1_0.png"))
    committed = ns.current_name(state)
    for step in ("list", "embed", "templates", "match", "dedup", "outputs"):
        monkeypatch.setenv(nightly.FAULT_ENV, step)
        with pytest.raises(nightly.InjectedFault):
            night("2026-12-03")
        assert ns.current_name(state) == committed, step
        assert not os.path.exists(os.path.join(state, ns.LOCK)), step
        assert not os.path.exists(os.path.join(state, "runs", "2026-12-03")), step
    # Killed just after its commit: the state is the new one; the next run publishes its date's outputs.
    monkeypatch.setenv(nightly.FAULT_ENV, "commit")
    with pytest.raises(nightly.InjectedFault):
        night("2026-12-03")
    assert ns.current_name(state) != committed and not os.path.exists(os.path.join(state, "runs", "2026-12-03"))
    assert nightly.publish_committed_run(state)
    assert json.load(open(os.path.join(state, "runs", "2026-12-03", "manifest.json")))["generation"] == \
        ns.current_name(state)
    monkeypatch.delenv(nightly.FAULT_ENV)
    recovered = night("2026-12-03")  # the date again, from 12-02's state
    assert recovered["replaced_date"] and recovered["counts"]["removed"] == 1 and recovered["counts"]["added"] == 0
    assert len(os.listdir(os.path.join(state, ns.GENERATIONS))) <= 3  # killed runs' generations removed
    assert _state_clusters(state)[0] == _full_recompute(cat, tiny_model_dir, str(tmp_path / "full2"))[0]


def test_new_model_re_embeds_everything(tmp_path, tiny_model_dir, tiny_rgb_model_dir):
    cat = _catalogue(tmp_path, n_groups=4)
    state = str(tmp_path / "state")
    _nightly(cat, tiny_model_dir, state, "2026-12-01")
    other = str(tmp_path / "other_model")
    from tests.conftest import export_tiny_encoder
    export_tiny_encoder(other, seed=7)
    manifest = _nightly(cat, other, state, "2026-12-02")
    assert manifest["full"] and "new model" in manifest["full_reason"]
    assert manifest["counts"]["embedded"] == manifest["counts"]["items"]


def test_a_state_decoded_by_another_decode_version_is_re_embedded(tmp_path, tiny_model_dir):
    """The model_id does not cover decode's code: a state written by another decode version (or before
    versions were recorded) is embedded again, once."""
    from beam_pipeline import io as bio
    from siamese_core.decode import DECODE_VERSION
    cat = _catalogue(tmp_path, n_groups=4)
    state = str(tmp_path / "state")
    first = _nightly(cat, tiny_model_dir, state, "2026-12-01")
    assert first["decode_version"] == DECODE_VERSION
    doc_path = os.path.join(ns.current(state)["dir"], ns.STATE_DOC)
    doc = bio.read_json(doc_path)
    del doc["decode_version"]  # as a state written before the version was recorded
    bio.write_json(doc_path, doc)
    manifest = _nightly(cat, tiny_model_dir, state, "2026-12-02")
    assert manifest["full"] and f"decode version {DECODE_VERSION}" in manifest["full_reason"]
    assert manifest["counts"]["embedded"] == manifest["counts"]["items"]
    assert not _nightly(cat, tiny_model_dir, state, "2026-12-03")["full"]


def test_two_runs_cannot_hold_the_state(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("SIAMESE_DEDUP_DEBUG", raising=False)
    cat = _catalogue(tmp_path, n_groups=3)
    state = str(tmp_path / "state")
    ns.acquire_lock(state, "someone-else")
    with pytest.raises(ns.StateLocked, match="someone-else"):
        _nightly(cat, tiny_model_dir, state, "2026-12-01")
    assert ns.current_name(state) is None
    from beam_pipeline import cli
    code = cli.main(["nightly", "--catalogue", os.path.join(cat, "*.png"), "--model_dir", tiny_model_dir,
                     "--state", state])
    err = capsys.readouterr().err
    assert code == 2 and "locked by another nightly run" in err and "--break_lock" in err and "Traceback" not in err
    manifest = _nightly(cat, tiny_model_dir, state, "2026-12-01", "--break_lock")
    assert manifest["full"] and not os.path.exists(os.path.join(state, ns.LOCK))


def test_state_on_gcs_lock_and_runs(tmp_path, tiny_model_dir, gcs_bucket):
    """The lock is a create-only object (generation precondition 0) on gs:// too; a run commits there."""
    state = f"{gcs_bucket}/nightly_state"
    ns.acquire_lock(state, "run-a")
    with pytest.raises(ns.StateLocked, match="run-a"):
        ns.acquire_lock(state, "run-b")
    ns.release_lock(state, "run-b")  # not ours: stays
    with pytest.raises(ns.StateLocked):
        ns.acquire_lock(state, "run-b")
    ns.release_lock(state, "run-a")
    cat = _catalogue(tmp_path, n_groups=4)
    first = _nightly(cat, tiny_model_dir, state, "2026-12-01")
    _write(cat, "late.png", _image(2, noise=9))
    second = _nightly(cat, tiny_model_dir, state, "2026-12-02")
    assert second["counts"]["added"] == 1 and not second["full"] and second["parent"] == first["generation"]
    assert ns.current_name(state) == second["generation"]
    from apache_beam.io.filesystems import FileSystems
    assert not FileSystems.exists(f"{state}/{ns.LOCK}")


def test_gcs_lock_relies_on_the_generation_precondition(monkeypatch):
    """Two runs that both saw no lock: the store refuses the second create (if_generation_match=0)."""
    from google.api_core import exceptions

    calls = []

    class Blob:
        def upload_from_string(self, text, content_type, if_generation_match):
            calls.append(if_generation_match)
            raise exceptions.PreconditionFailed("object exists")

    class Client:
        def bucket(self, name):
            return type("B", (), {"blob": lambda self, n: Blob()})()

    monkeypatch.setattr("google.cloud.storage.Client", Client)
    monkeypatch.setattr(ns.FileSystems, "exists", lambda path: False)
    monkeypatch.setattr(ns.bio, "read_text", lambda path: '{"run_id": "the-other-run"}')
    with pytest.raises(ns.StateLocked, match="the-other-run"):
        ns.acquire_lock("gs://bucket/state", "mine")
    assert calls == [0]


def test_unchanged_size_and_time_keep_the_hash_unread(tmp_path):
    cat = _catalogue(tmp_path, n_groups=2)
    glob = os.path.join(cat, "*.png")
    first = nightly.list_items(glob)
    assert all(len(h) == 64 for h in first.column("content_sha256").to_pylist())
    # A state that recorded another hash for the same size and time: taken as it is, the file not read.
    marked = first.set_column(first.schema.get_field_index("content_sha256"), "content_sha256",
                              pa.array(["x" * 64] * first.num_rows))
    assert set(nightly.list_items(glob, marked).column("content_sha256").to_pylist()) == {"x" * 64}
    # A file written again (new modification time) is read: its true hash, the others still taken.
    name = sorted(os.listdir(cat))[0]
    os.utime(os.path.join(cat, name), ns=(1, 1))
    again = dict(zip(*(nightly.list_items(glob, marked).column(c).to_pylist() for c in ("item_id", "content_sha256"))))
    assert again[name] == dict(zip(first.column("item_id").to_pylist(),
                                   first.column("content_sha256").to_pylist()))[name]
    assert sum(h == "x" * 64 for h in again.values()) == first.num_rows - 1


def test_an_unknown_keeper_policy_is_refused_before_anything_runs(capsys):
    # The valid values are dedup's (clustering.KEEPER_POLICIES): a typo fails at once, not after embedding.
    with pytest.raises(SystemExit) as stop:
        nightly.build_parser().parse_args(["--catalogue", "x/*", "--model_dir", "m", "--state", "s",
                                           "--keeper_policy", "largest"])
    assert stop.value.code == 2 and "invalid choice: 'largest'" in capsys.readouterr().err


def test_the_engine_is_chosen_by_the_night_and_the_runner():
    choose = nightly.choose_engine
    assert choose("auto", None, 500, 5000, []) == ("local", "500 items to embed, at most --local_max_items 5000")
    assert choose("auto", None, 500, 5000, ["--runner", "DirectRunner"])[0] == "local"
    assert choose("auto", None, 6000, 5000, [])[0] == "beam"  # too many to hold in this process
    assert choose("auto", None, 500, 5000, ["--runner", "DataflowRunner", "--project", "p"]) == \
        ("beam", "--runner DataflowRunner")
    assert choose("local", None, 10**6, 5000, ["--runner", "DataflowRunner"]) == ("local", "--engine local")
    assert choose("beam", None, 1, 5000, []) == ("beam", "--engine beam")
    assert choose("local", "no earlier state", 10, 5000, []) == ("beam", "a full run uses the pipelines")


def test_keeper_policy_column_without_its_table_is_refused_before_any_work(tmp_path, tiny_model_dir):
    cat = _catalogue(tmp_path, n_groups=2)
    state = str(tmp_path / "state")
    with pytest.raises(ValueError, match="needs --keeper_table and --keeper_column"):
        _nightly(cat, tiny_model_dir, state, "2026-12-01", "--keeper_policy", "column")
    assert ns.current_name(state) is None and not os.path.exists(os.path.join(state, ns.LOCK))


def test_a_catalogue_on_gcs_runs_its_small_nights_in_process(tmp_path, tiny_model_dir, gcs_bucket):
    """The local engine reads a gs:// catalogue (listing, hashes, bytes) as the pipelines do: a copy added
    in the bucket is embedded in process and joins its original's cluster, as a full recompute says."""
    import io as _io

    from apache_beam.io.filesystems import FileSystems

    def upload(name, pixels=None, data=None):
        if data is None:
            buffer = _io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            data = buffer.getvalue()
        with FileSystems.create(f"{gcs_bucket}/nightly_catalogue/{name}") as f:  # the bucket is the session's
            f.write(data)

    for g in range(4):
        upload(f"g{g}.png", _image(g))
    upload("broken.png", data=b"not a PNG file")  # a failures row every night, never a silent gap
    glob = f"{gcs_bucket}/nightly_catalogue/*.png"
    state = str(tmp_path / "state")

    def night(date):
        return nightly.run(["--catalogue", glob, "--model_dir", tiny_model_dir, "--state", state,
                            "--run_date", date, "--threshold", str(THRESHOLD)])

    first = night("2026-12-01")
    upload("g2_copy.png", _image(2, noise=4))
    second = night("2026-12-02")
    assert first["engine"] == "beam" and second["engine"] == "local"
    assert (second["counts"]["added"], second["counts"]["embedded"], second["counts"]["failed"]) == (1, 1, 1)
    clusters, _ = _state_clusters(state)
    assert frozenset({"g2.png", "g2_copy.png"}) in clusters


def test_the_service_runs_each_night_at_its_hour_on_the_state(tmp_path, tiny_model_dir, monkeypatch):
    """--serve_at: started with no state, the first (full) night runs at once; the catalogue grows during the
    day; the next night, at 02:00 UTC, embeds only what was added. A stop between nights ends the service
    with no lock left, and the clusters are a full recompute's."""

    cat = _catalogue(tmp_path)
    state = str(tmp_path / "state")
    nights_started = []
    clock = {"now": datetime.datetime(2026, 12, 1, 9, 30, tzinfo=datetime.timezone.utc)}

    def sleep(seconds):
        if len(nights_started) == 1 and not os.path.exists(os.path.join(cat, "later.png")):  # the day's uploads
            _write(cat, "later.png", _image(77))
            _write(cat, "later_copy.png", _image(77, noise=3))
        if len(nights_started) == 2:
            raise KeyboardInterrupt  # SIGTERM from systemd, say
        clock["now"] += datetime.timedelta(seconds=seconds)

    def run_night(original, run_date):
        nights_started.append((run_date, clock["now"]))
        return original(run_date)

    real_serve = nightly_schedule.serve

    def serve(run, at, last, **_):
        return real_serve(functools.partial(run_night, run), at, last, clock=lambda: clock["now"], sleep=sleep)

    monkeypatch.setattr(nightly_schedule, "serve", serve)
    summary = nightly.run(["--catalogue", os.path.join(cat, "*.png"), "--model_dir", tiny_model_dir,
                           "--state", state, "--threshold", str(THRESHOLD), "--serve_at", "02:00"])
    assert [d for d, _ in nights_started] == ["2026-12-01", "2026-12-02"]
    assert nights_started[1][1] == datetime.datetime(2026, 12, 2, 2, 0, tzinfo=datetime.timezone.utc)
    assert [n["full"] for n in summary["nights"]] == [True, False] and summary["stopped"] == "interrupted"
    second = json.load(open(os.path.join(state, "runs", "2026-12-02", "manifest.json")))
    assert second["counts"]["added"] == second["counts"]["embedded"] == 2
    assert not os.path.exists(os.path.join(state, ns.LOCK))
    assert _state_clusters(state)[0] == _full_recompute(cat, tiny_model_dir, str(tmp_path / "full"))[0]


def test_the_service_refuses_a_run_date_and_a_bad_hour(tmp_path, tiny_model_dir, capsys):
    base = ["nightly", "--catalogue", str(tmp_path / "*.png"), "--model_dir", tiny_model_dir,
            "--state", str(tmp_path / "state")]
    assert cli.main([*base, "--serve_at", "02:00", "--run_date", "2026-12-01"]) == cli.EXIT_USER_ERROR
    assert "give no --run_date" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--serve_at", "2am"])
    assert exit_info.value.code == 2 and "--serve_at is a time of day HH:MM" in capsys.readouterr().err


def test_the_service_as_a_process_stops_cleanly_on_sigterm(tmp_path, tiny_model_dir):
    """The real command: `nightly --serve_at` runs the missed night at its start, then waits; SIGTERM (what
    systemd, docker and Kubernetes send) ends it with its summary, exit 0 and the lock released."""
    cat = _catalogue(tmp_path)
    state = str(tmp_path / "state")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen([sys.executable, "-m", "beam_pipeline.cli", "nightly", "--catalogue",
                             os.path.join(cat, "*.png"), "--model_dir", tiny_model_dir, "--state", state,
                             "--threshold", str(THRESHOLD), "--serve_at", "00:00"],
                            cwd=root, env={**os.environ, "PYTHONPATH": root},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []  # the log, read as it comes: the service says "next night" before each wait
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while sum("next night" in line for line in lines) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    out = proc.stdout.read()  # a few lines of JSON: they fit the pipe's buffer
    reader.join(10)
    err = "".join(lines)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["stopped"] == "interrupted" and summary["serve_at"] == "00:00 UTC"
    assert [n["full"] for n in summary["nights"]] == [True]
    assert ns.current_name(state) is not None and not os.path.exists(os.path.join(state, ns.LOCK))


def test_a_stop_during_a_night_ends_the_service_even_when_beam_rewraps_it(tmp_path, tiny_model_dir, monkeypatch):
    """SIGTERM while a night's pipeline runs: Beam re-raises the KeyboardInterrupt as another error, which the
    service must not log as a failed night and go on: it stops, and the night's lock is released."""

    cat = _catalogue(tmp_path)
    state = str(tmp_path / "state")

    def interrupted_run(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            raise RuntimeError("KeyboardInterrupt [while running 'Embed']") from None

    monkeypatch.setattr(nightly, "_run_locked", interrupted_run)
    real_serve = nightly_schedule.serve
    now = datetime.datetime(2026, 12, 1, 9, 0, tzinfo=datetime.timezone.utc)
    monkeypatch.setattr(nightly_schedule, "serve", lambda run, at, last, **_: real_serve(
        run, at, last, clock=lambda: now, sleep=lambda s: pytest.fail("the service went on after the stop")))
    summary = nightly.run(["--catalogue", os.path.join(cat, "*.png"), "--model_dir", tiny_model_dir,
                           "--state", state, "--serve_at", "02:00"])
    assert summary == {"serve_at": "02:00 UTC", "nights": [], "stopped": "interrupted"}
    assert not os.path.exists(os.path.join(state, ns.LOCK))
