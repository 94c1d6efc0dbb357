"""Runs that never lie, probed as a user would: stale inputs, edited cards, failed and interrupted runs,
entries that are not files, bad flags. Stages run through the command line (`cli.main`), in-process, on
the pinned local runner."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from beam_pipeline import cli, outputs
from beam_pipeline.io import read_table_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)


@pytest.fixture
def catalogue(tmp_path):
    d = tmp_path / "cat"
    d.mkdir()
    for k in range(6):
        _png(d / f"item{k}.png", k)
    shutil.copy(d / "item0.png", d / "copy0.png")  # a byte-identical duplicate: one match at 1.0
    return d


def _cli(*argv, capsys=None):
    code = cli.main(list(argv))
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


# Ctrl-C's exit statuses: 130 from the command; or death by SIGINT, which a shell also reports as 130.
# (CPython exits by SIGINT whenever a KeyboardInterrupt went through exec() of a source string, as
# numpy's and scipy's lazy imports do, even if the program handled it: a signal that lands in such an
# import ends that way.)
INTERRUPTED = (cli.EXIT_INTERRUPTED, -signal.SIGINT)
# The tiny untrained encoder puts unrelated noise images close together: only identical bytes match here.
THRESHOLD = "0.999"


def _embed(cat, model, work, *extra, capsys=None):
    return _cli("embed", "--input", f"{cat}/*.png", "--model_dir", model, "--output", str(work), *extra,
                capsys=capsys)


def _match(work, *extra, capsys=None):
    return _cli("match", "--templates", f"{work}/templates/*.parquet", "--output", str(work),
                "--threshold", THRESHOLD, *extra, capsys=capsys)


def _dedup(work, matches=None, *extra, capsys=None):
    return _cli("dedup", "--templates", f"{work}/templates/*.parquet",
                "--matches", matches or f"{work}/matches/*.parquet", "--output", str(work), *extra, capsys=capsys)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_stale_matches_and_clusters_are_refused_never_used(catalogue, tiny_model_dir, tmp_path, capsys):
    """The probe: embed, match, replace one file by another image, embed again, dedup with the old matches:
    it dropped a non-duplicate. Now the old matches are moved aside, and given explicitly are refused."""
    work = tmp_path / "work"
    assert _embed(catalogue, tiny_model_dir, work)[0] == 0
    assert _match(work)[0] == 0
    assert _dedup(work)[0] == 0
    assert cli.main(["report", "--workdir", str(work)]) == 0
    kept = tmp_path / "old_matches"
    shutil.copytree(work / "matches", kept)
    _png(catalogue / "copy0.png", 99)  # no longer a copy of item0
    capsys.readouterr()
    assert _embed(catalogue, tiny_model_dir, work)[0] == 0
    # Everything made from the old templates is set aside, not left to be mixed with the new.
    assert not (work / "matches").exists() and not (work / "clusters").exists()
    assert not (work / "report.json").exists()
    stale = os.listdir(work / "stale")
    assert len(stale) == 1 and stale[0].startswith("embed-")
    code, err = _dedup(work, matches=f"{kept}/*.parquet", capsys=capsys)
    assert code == 2 and "were made from other templates" in err and "rerun match" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    # Stale clusters beside fresh matches: the report refuses them by name (it was a bare KeyError).
    shutil.copytree(work / "stale" / stale[0] / "clusters", work / "clusters")
    shutil.copy(work / "stale" / stale[0] / "match_run.json", work / "match_run.json")
    assert _match(work)[0] == 0  # new matches; moves the copied clusters aside again
    shutil.copytree(work / "stale" / stale[0] / "clusters", work / "clusters")
    capsys.readouterr()
    code, err = _cli("report", "--workdir", str(work), capsys=capsys)
    assert code == 2 and "clusters" in err and "rerun dedup" in err


def test_an_unchanged_catalogue_embedded_again_keeps_its_matches(catalogue, tiny_model_dir, tmp_path):
    work = tmp_path / "work"
    _embed(catalogue, tiny_model_dir, work)
    _match(work)
    _embed(catalogue, tiny_model_dir, work)  # same content, new run id
    assert (work / "matches").exists() and not (work / "stale").exists()
    assert _dedup(work)[0] == 0
    clusters = read_table_dir(str(work), "clusters")
    drop = [r["item_id"] for r in clusters.to_pylist() if not r["is_keeper"]]
    assert drop == ["item0.png"]  # copy0.png and item0.png are one; first_id keeps copy0.png


def test_an_edited_input_spec_is_refused_before_anything_is_touched(catalogue, tiny_model_dir, tmp_path, capsys):
    """The probe: value_range edited to [0, 1] embedded with the same model_id at cosine -0.5..0.04."""
    work = tmp_path / "work"
    _embed(catalogue, tiny_model_dir, work)
    before = _files(work)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    card = json.loads((model / "model_card.json").read_text())
    card["input_spec"]["value_range"] = [0, 1]
    (model / "model_card.json").write_text(json.dumps(card))
    capsys.readouterr()
    code, err = _cli("embed", "--input", f"{catalogue}/*.png", "--model_dir", str(model), "--output", str(work),
                     capsys=capsys)
    assert code == 2 and "input_spec or model_id was edited" in err
    assert _files(work) == before


@pytest.mark.parametrize("damage", ["wrong_dimension", "not_a_model"])
def test_a_refused_model_leaves_the_last_outputs_whole(catalogue, tiny_model_dir, tmp_path, capsys, damage):
    work = tmp_path / "work"
    _embed(catalogue, tiny_model_dir, work)
    _match(work)
    before = _files(work)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    card = json.loads((model / "model_card.json").read_text())
    if damage == "wrong_dimension":
        card["embedding_dim"] = 3
    else:
        Image.new("RGB", (4, 4)).save(model / "model.keras", format="PNG")
    (model / "model_card.json").write_text(json.dumps(card))
    capsys.readouterr()
    code, err = _cli("embed", "--input", f"{catalogue}/*.png", "--model_dir", str(model), "--output", str(work),
                     capsys=capsys)
    assert code == 2 and "Traceback" not in err
    assert _files(work) == before  # templates and matches as they were; no _staging, no beam-temp


def test_a_fault_inside_the_pipeline_loses_and_doubles_nothing(catalogue, tiny_model_dir, tmp_path, monkeypatch):
    from beam_pipeline import embed

    work = tmp_path / "work"
    _embed(catalogue, tiny_model_dir, work)
    before = _files(work)
    good = read_table_dir(str(work), "templates").sort_by("item_id")

    original = embed.ToTemplatesFn.process

    def faulty(self, element):
        raise RuntimeError("injected fault")
        yield from original(self, element)

    monkeypatch.setattr(embed.ToTemplatesFn, "process", faulty)
    with pytest.raises(Exception, match="injected fault"):
        embed.run(["--input", f"{catalogue}/*.png", "--model_dir", tiny_model_dir, "--output", str(work)])
    assert _files(work) == before
    monkeypatch.setattr(embed.ToTemplatesFn, "process", original)
    embed.run(["--input", f"{catalogue}/*.png", "--model_dir", tiny_model_dir, "--output", str(work)])
    again = read_table_dir(str(work), "templates").sort_by("item_id")
    assert again.column("item_id").to_pylist() == good.column("item_id").to_pylist()  # nothing lost or doubled
    assert _files(work) == before


def test_ctrl_c_leaves_the_last_outputs_whole(catalogue, tiny_model_dir, tmp_path):
    """A real SIGINT to the command while the run is under way (its staging directory exists)."""
    work = tmp_path / "work"
    _embed(catalogue, tiny_model_dir, work)
    before = _files(work)
    for k in range(40):  # enough work that the run is still going when the signal comes
        _png(catalogue / f"more{k}.png", 100 + k)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "beam_pipeline.cli", "embed", "--input", f"{catalogue}/*.png",
                             "--model_dir", tiny_model_dir, "--output", str(work)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (work / "_staging").exists() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in INTERRUPTED, err[-2000:]
    assert "interrupted: nothing was published" in err
    assert _files(work) == before


def test_every_entry_is_accounted_for(tmp_path, tiny_model_dir):
    """The probe: symlink loops and dangling links vanished in Beam's listing, tar link and device members
    were skipped (13 entries in, 10 rows out)."""
    cat = tmp_path / "cat"
    (cat / "sub").mkdir(parents=True)
    _png(cat / "good.png", 1)
    _png(cat / "sub" / "deep.png", 2)
    os.symlink("good.png", cat / "link.png")  # a link to a file: an item like any other
    os.symlink("missing.png", cat / "dangling.png")
    os.symlink("loop.png", cat / "loop.png")
    os.mkfifo(cat / "fifo.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _png(elsewhere / "x.png", 3)
    os.symlink(elsewhere, cat / "linked_dir")
    work = tmp_path / "work"
    summary_code = cli.main(["embed", "--input", f"{cat}/**/*.png", "--model_dir", tiny_model_dir,
                             "--output", str(work)])
    assert summary_code == 0
    templates = set(read_table_dir(str(work), "templates").column("item_id").to_pylist())
    failures = {r["item_id"]: r["error"] for r in read_table_dir(str(work), "failures").to_pylist()}
    assert templates == {"good.png", "link.png", "sub/deep.png"}
    assert set(failures) == {"dangling.png", "loop.png", "fifo.png", "linked_dir"}
    assert "dangling symbolic link" in failures["dangling.png"] and "loop" in failures["loop.png"]
    assert "named pipe" in failures["fifo.png"] and "not followed" in failures["linked_dir"]

    shard = tmp_path / "shards" / "s.tar"
    shard.parent.mkdir()
    data = (cat / "good.png").read_bytes()
    with tarfile.open(shard, "w") as tar:
        for name in ("a.png", "b.png"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, kind, target in (("sym.png", tarfile.SYMTYPE, "a.png"), ("hard.png", tarfile.LNKTYPE, "a.png"),
                                   ("dev.png", tarfile.CHRTYPE, ""), ("pipe.png", tarfile.FIFOTYPE, "")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    work2 = tmp_path / "work2"
    assert cli.main(["embed", "--input", f"{shard.parent}/*.tar", "--model_dir", tiny_model_dir,
                     "--output", str(work2)]) == 0
    rows = read_table_dir(str(work2), "templates").num_rows
    failed = {r["item_id"]: r["error"] for r in read_table_dir(str(work2), "failures").to_pylist()}
    assert rows == 2 and set(failed) == {"s.tar#sym.png", "s.tar#hard.png", "s.tar#dev.png", "s.tar#pipe.png"}
    assert "symbolic link" in failed["s.tar#sym.png"] and "character device" in failed["s.tar#dev.png"]


def test_a_run_in_which_every_item_failed_is_an_error(tmp_path, tiny_model_dir, capsys):
    cat = tmp_path / "cat"
    cat.mkdir()
    (cat / "a.png").write_bytes(b"")
    (cat / "b.png").write_bytes(b"not an image")
    work = tmp_path / "work"
    capsys.readouterr()
    code, err = _cli("embed", "--input", f"{cat}/*.png", "--model_dir", tiny_model_dir, "--output", str(work),
                     capsys=capsys)
    assert code == 2 and "every one of the 2 items" in err and "decode 2" in err
    assert not os.path.exists(work) or _files(work) == []
    code, _ = _cli("embed", "--input", f"{cat}/*.png", "--model_dir", tiny_model_dir, "--output", str(work),
                   "--allow_all_failed")
    assert code == 0 and read_table_dir(str(work), "failures").num_rows == 2


@pytest.mark.parametrize("argv, says", [
    (["dedup", "--templates", "t", "--matches", "m", "--output", "o", "--threshold", "1.5"], "out of range"),
    (["embed", "--input", "x", "--model_dir", "m", "--output", "o", "--max_pixels", "-1"], "out of range"),
    (["match", "--templates", "t", "--output", "o", "--threshhold", "0.9"], "did you mean --threshold"),
    (["match", "--templates", "t", "--output", "o", "--block_size", "zero"], "not an integer"),
])
def test_bad_flags_are_one_argparse_line_and_status_2(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and "Traceback" not in err


def test_two_threshold_flags_are_refused(tmp_path, capsys):
    code, err = _cli("match", "--templates", f"{tmp_path}/*.parquet", "--output", str(tmp_path), "--threshold", "0.9",
                     "--target_fmr", "0.01", capsys=capsys)
    assert code == 2 and "at most one of" in err


def test_dedup_refuses_a_threshold_below_the_matches_own(catalogue, tiny_model_dir, tmp_path, capsys):
    work = tmp_path / "work"
    _embed(catalogue, tiny_model_dir, work)
    _match(work)
    capsys.readouterr()
    code, err = _dedup(work, None, "--threshold", "0.5", capsys=capsys)
    assert code == 2 and "below the 0.999" in err


def test_report_thumbnails_keep_the_embed_limits(tmp_path):
    from beam_pipeline import report_figures

    big = tmp_path / "big.png"
    Image.new("L", (400, 300)).save(big)
    assert report_figures.read_thumbnail(str(big)) is not None
    assert report_figures.read_thumbnail(str(big), max_pixels=100_000) is None  # 120,000 pixels
    assert report_figures.read_thumbnail(str(big), max_bytes=10) is None
    eps = tmp_path / "x.eps"
    Image.new("L", (8, 8)).save(eps, format="EPS") if shutil.which("gs") else eps.write_bytes(b"%!PS-Adobe-3.0 EPSF")
    assert report_figures.read_thumbnail(str(eps)) is None  # not on the allow-list


def test_dedup_and_match_pin_the_local_runner(catalogue, tiny_model_dir, tmp_path, monkeypatch):
    from beam_pipeline import runner

    runners = []
    real = runner.apply_local_defaults

    def spy(options):
        real(options)
        from apache_beam.options.pipeline_options import StandardOptions
        runners.append(options.view_as(StandardOptions).runner)

    monkeypatch.setattr(runner, "apply_local_defaults", spy)
    work = tmp_path / "work"
    _embed(catalogue, tiny_model_dir, work)
    _match(work)
    _dedup(work)
    assert runners == ["FnApiRunner"] * 3


def _random_templates(work, n, dim=8, seed=0):
    """A templates table of `n` random unit embeddings (enough work that a stage runs for seconds)."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from schemas.tables import templates_schema

    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"i{k:06d}" for k in range(n)]
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    table = pa.table({"item_id": ids, "source_uri": ids, "content_sha256": [f"{k:064d}" for k in range(n)],
                      "embedding": list(x), "model_id": ["0123456789abcdef"] * n, "width": [1] * n,
                      "height": [1] * n, "embedded_at": [now] * n, "run_id": ["e"] * n},
                     schema=templates_schema(dim))
    os.makedirs(work / "templates")
    pq.write_table(table, work / "templates" / "templates-00000-of-00001.parquet")


@pytest.mark.parametrize("stage", ["match", "dedup"])
def test_ctrl_c_in_match_and_dedup_leaves_the_last_outputs_whole(tmp_path, stage):
    work = tmp_path / "work"
    _random_templates(work, 60_000)
    match_argv = ["match", "--templates", f"{work}/templates/*.parquet", "--output", str(work),
                  "--threshold", "0.93", "--block_size", "2048"]
    dedup_argv = ["dedup", "--templates", f"{work}/templates/*.parquet", "--matches", f"{work}/matches/*.parquet",
                  "--output", str(work)]
    assert cli.main(match_argv) == 0
    assert cli.main(dedup_argv) == 0
    before = {p: (work / p).read_bytes() for p in _files(work)}
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "beam_pipeline.cli",
                             *(match_argv if stage == "match" else dedup_argv)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (work / "_staging").exists() and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    time.sleep(0.3)  # into the run
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode in INTERRUPTED, err[-2000:]
    assert "interrupted: nothing was published" in err
    assert {p: (work / p).read_bytes() for p in _files(work)} == before  # whole; no _staging left
