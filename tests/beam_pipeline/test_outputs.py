"""Staged runs publish on success only; lineage in the footers; mixed or unattributed tables refused."""
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_pipeline import outputs

SCHEMA = pa.schema([pa.field("x", pa.int64())])


def _shard(directory, name, k, n, lineage, rows=(1, 2)):
    os.makedirs(directory, exist_ok=True)
    schema = SCHEMA if lineage is None else outputs.with_lineage(SCHEMA, lineage)
    pq.write_table(pa.table({"x": list(rows)}, schema=schema), os.path.join(directory, f"{name}-{k:05d}-of-{n:05d}.parquet"))


def _table(output, name, run_id, stage="match", shards=1, **extra):
    for k in range(shards):
        _shard(os.path.join(output, name), name, k, shards, {"stage": stage, "run_id": run_id, **extra})


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_publish_replaces_the_previous_outputs_and_leaves_no_staging(tmp_path):
    out = str(tmp_path)
    _table(out, "matches", "old", shards=3)
    with outputs.StagedRun(out, "match", "new") as staged:
        _table(staged.dir, "matches", "new")
        os.makedirs(os.path.join(staged.dir, "matches", "beam-temp-matches-1"))  # the sink's leftovers
        with open(staged.path("match_run.json"), "w") as f:
            f.write("{}")
        published = staged.publish()
    assert _tree(out) == ["match_run.json", "matches/matches-00000-of-00001.parquet"]
    assert [d["run_id"] for d in outputs.table_lineage(f"{out}/matches/*.parquet", "matches")] == ["new"]
    assert sorted(os.path.basename(p) for p in published) == ["match_run.json", "matches"]


@pytest.mark.parametrize("fault", [RuntimeError("worker died"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_run_leaves_the_last_outputs_whole(tmp_path, fault):
    out = str(tmp_path)
    _table(out, "matches", "good", shards=2)
    before = _tree(out)
    with pytest.raises(type(fault)):
        with outputs.StagedRun(out, "match", "bad") as staged:
            _table(staged.dir, "matches", "bad", shards=5)
            raise fault
    assert _tree(out) == before  # whole, and no _staging debris
    assert not os.path.exists(tmp_path / "_staging")


def test_debris_of_a_killed_run_is_removed_by_the_next_run_of_that_stage(tmp_path):
    out = str(tmp_path)
    killed = tmp_path / "_staging" / "embed-killed" / "templates"
    killed.mkdir(parents=True)
    (killed / "beam-temp-x").mkdir()
    other = tmp_path / "_staging" / "match-running"
    other.mkdir()
    with outputs.StagedRun(out, "embed", "next"):
        assert not (tmp_path / "_staging" / "embed-killed").exists()
        assert other.exists()  # another stage's run is not this run's business


def test_publishing_moves_outputs_of_later_stages_aside(tmp_path):
    out = str(tmp_path)
    _table(out, "templates", "e1", stage="embed")
    _table(out, "matches", "m1", templates={"fingerprint": "A"})
    _table(out, "clusters", "d1", stage="dedup", templates={"fingerprint": "A"}, matches={"run_id": "m1"})
    (tmp_path / "report.json").write_text('{"lineage": {"templates": {"fingerprint": "A"}}}')
    with outputs.StagedRun(out, "match", "m2") as staged:
        _table(staged.dir, "matches", "m2", templates={"fingerprint": "A"})
        staged.publish()
    assert sorted(os.listdir(tmp_path / "stale" / "match-m2")) == ["clusters", "report.json"]
    assert not (tmp_path / "clusters").exists() and not (tmp_path / "report.json").exists()
    assert (tmp_path / "templates").exists()  # upstream of match: untouched


def test_embed_keeps_later_outputs_made_from_the_same_content(tmp_path):
    out = str(tmp_path)
    _table(out, "matches", "m1", templates={"fingerprint": "A"})
    _table(out, "clusters", "d1", stage="dedup", templates={"fingerprint": "B"}, matches={"run_id": "m1"})
    with outputs.StagedRun(out, "embed", "e2") as staged:
        _table(staged.dir, "templates", "e2", stage="embed")
        staged.publish(outputs.downstream_of_templates("A"))
    assert (tmp_path / "matches").exists()  # made from templates of the same content: still valid
    assert os.listdir(tmp_path / "stale" / "embed-e2") == ["clusters"]


def test_an_output_this_run_did_not_write_is_set_aside_not_kept(tmp_path):
    """A match in pairs mode writes verifications; an all_pairs rerun must not leave the old ones beside
    its matches as if they were its own."""
    out = str(tmp_path)
    _table(out, "verifications", "m1")
    with outputs.StagedRun(out, "match", "m2") as staged:
        _table(staged.dir, "matches", "m2")
        staged.publish()
    assert not (tmp_path / "verifications").exists()
    assert os.listdir(tmp_path / "stale" / "match-m2") == ["verifications"]


def test_table_lineage_refuses_mixed_incomplete_or_unattributed_tables(tmp_path):
    d = tmp_path / "matches"
    _shard(d, "matches", 0, 2, {"stage": "match", "run_id": "a"})
    with pytest.raises(outputs.LineageError, match="2 matches shards, their names say|1 matches shards"):
        outputs.table_lineage(f"{d}/*.parquet", "matches")
    _shard(d, "matches", 1, 2, {"stage": "match", "run_id": "b"})
    with pytest.raises(outputs.LineageError, match="from 2 runs"):
        outputs.table_lineage(f"{d}/*.parquet", "matches")
    _shard(d, "matches", 1, 2, None)
    with pytest.raises(outputs.LineageError, match="carry no lineage"):
        outputs.table_lineage(f"{d}/*.parquet", "matches")
    with pytest.raises(FileNotFoundError):
        outputs.table_lineage(f"{tmp_path}/none/*.parquet", "matches")


def test_single_run_refuses_two_runs_and_another_stage(tmp_path):
    _table(str(tmp_path / "a"), "matches", "m1")
    _table(str(tmp_path / "b"), "matches", "m2")
    with pytest.raises(outputs.LineageError, match="2 match runs"):
        outputs.single_run(f"{tmp_path}/*/matches/*.parquet", "matches", "match")
    with pytest.raises(outputs.LineageError, match="not clusters written by dedup"):
        outputs.single_run(f"{tmp_path}/a/matches/*.parquet", "clusters", "dedup")


def test_templates_fingerprint_follows_content_not_runs(tmp_path):
    from schemas.tables import templates_schema
    import datetime

    def write(directory, contents, run_id):
        now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
        ids = sorted(contents)
        table = pa.table({"item_id": ids, "source_uri": ids, "content_sha256": [contents[i] for i in ids],
                          "embedding": [[1.0, 0.0]] * len(ids), "model_id": ["m" * 16] * len(ids),
                          "width": [1] * len(ids), "height": [1] * len(ids), "embedded_at": [now] * len(ids),
                          "run_id": [run_id] * len(ids)}, schema=templates_schema(2))
        os.makedirs(directory, exist_ok=True)
        pq.write_table(table, os.path.join(directory, "templates-00000-of-00001.parquet"))
        return outputs.templates_fingerprint(os.path.join(directory, "*.parquet"))

    first = write(tmp_path / "1", {"a": "1" * 64, "b": "2" * 64}, "r1")
    again = write(tmp_path / "2", {"a": "1" * 64, "b": "2" * 64}, "r2")
    changed = write(tmp_path / "3", {"a": "1" * 64, "b": "3" * 64}, "r3")
    assert first["fingerprint"] == again["fingerprint"] != changed["fingerprint"]
    assert (first["items"], first["runs"]) == (2, ["r1"])


def test_publish_on_gcs(gcs_bucket):
    """gs:// has no directories: objects are copied over and the leftovers deleted."""
    from apache_beam.io.filesystems import FileSystems

    from beam_pipeline import io as bio

    out = f"{gcs_bucket}/publish"

    def put(path, data=b"x"):
        with FileSystems.create(path) as f:
            f.write(data)

    for k in range(3):
        put(f"{out}/matches/matches-{k:05d}-of-00003.parquet", b"old")
    with outputs.StagedRun(out, "match", "g2") as staged:
        put(f"{staged.dir}/matches/matches-00000-of-00001.parquet", b"new")
        put(f"{staged.dir}/match_run.json", b"{}")
        staged.publish()
    assert bio.match_paths(f"{out}/matches/*") == [f"{out}/matches/matches-00000-of-00001.parquet"]
    with FileSystems.open(f"{out}/matches/matches-00000-of-00001.parquet") as f:
        assert f.read() == b"new"
    assert bio.match_paths(f"{out}/_staging/**") == []
    with pytest.raises(RuntimeError):
        with outputs.StagedRun(out, "match", "g3") as staged:
            put(f"{staged.dir}/matches/matches-00000-of-00001.parquet", b"bad")
            raise RuntimeError("fault")
    with FileSystems.open(f"{out}/matches/matches-00000-of-00001.parquet") as f:
        assert f.read() == b"new"
    assert bio.match_paths(f"{out}/_staging/**") == []


def test_a_fault_while_publishing_undoes_the_moves_made(tmp_path, monkeypatch):
    """A move that fails half-way through publishing (a full disk, a lost connection): OUTPUT is either
    all new or all as it was, never templates of one run beside failures of another."""
    out = str(tmp_path)
    _table(out, "templates", "old", stage="embed")
    _table(out, "failures", "old", stage="embed")
    _table(out, "matches", "m-old", templates={"fingerprint": "A"})
    before = _tree(out)
    real, calls = outputs._move, []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == 4:  # matches aside, old templates out, new templates in, then old failures out
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(outputs, "_move", flaky)
    with pytest.raises(OSError, match="disk full"):
        with outputs.StagedRun(out, "embed", "new") as staged:
            _table(staged.dir, "templates", "new", stage="embed")
            _table(staged.dir, "failures", "new", stage="embed")
            staged.publish(outputs.downstream_of_templates("B"))
    assert _tree(out) == before
    assert [d["run_id"] for d in outputs.table_lineage(f"{out}/templates/*.parquet", "templates")] == ["old"]


def test_a_run_killed_while_publishing_is_repaired_by_the_next(tmp_path):
    """SIGKILL between moving the old templates out and the new ones in: the next run puts them back."""
    out = str(tmp_path)
    _table(out, "templates", "old", stage="embed")
    killed = tmp_path / "_staging" / "embed-killed"
    (killed / "_replaced").mkdir(parents=True)
    os.replace(tmp_path / "templates", killed / "_replaced" / "templates")  # where the kill left it
    _table(str(killed), "templates", "new", stage="embed")  # staged, never published
    with outputs.StagedRun(out, "embed", "next"):
        assert [d["run_id"] for d in outputs.table_lineage(f"{out}/templates/*.parquet", "templates")] == ["old"]
    assert not (tmp_path / "_staging").exists()
