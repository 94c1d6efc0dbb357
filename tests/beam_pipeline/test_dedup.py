"""The dedup pipeline on hand-made templates and matches tables, under TestPipeline (DirectRunner)."""
import datetime
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing import test_pipeline

from beam_pipeline import dedup, outputs
from beam_pipeline.io import read_table_dir
from schemas.tables import MATCHES_SCHEMA, templates_schema

MODEL = "0123456789abcdef"
# item: (width, height). Embeddings do not matter to dedup; all are e0.
ITEMS = {"a": (10, 10), "b": (30, 30), "c": (20, 20), "d": (5, 5), "e": (8, 8), "z": (40, 40)}
PAIRS = [("a", "b", 0.90), ("b", "c", 0.80), ("a", "c", 0.95), ("d", "e", 0.70)]


def _write_templates(path, items, model_id=MODEL):
    ids = list(items)
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    table = pa.table(
        {"item_id": ids, "source_uri": [f"/x/{i}.png" for i in ids], "content_sha256": ["0" * 64] * len(ids),
         "embedding": [[1.0, 0.0]] * len(ids), "model_id": [model_id] * len(ids),
         "width": [items[i][0] for i in ids], "height": [items[i][1] for i in ids],
         "embedded_at": [now] * len(ids), "run_id": ["e"] * len(ids)},
        schema=templates_schema(2),
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


def _write_matches(path, pairs, model_id=MODEL, templates=None, run_id="m", threshold=None):
    """A matches table with the lineage match would give it: made from the templates at `templates`
    (a glob; default the templates directory beside the matches directory)."""
    templates = templates or os.path.join(os.path.dirname(os.path.dirname(path)), "templates", "*.parquet")
    lineage = {"stage": "match", "run_id": run_id, "model_id": model_id, "threshold": threshold,
               "templates": outputs.templates_fingerprint(templates)}
    table = pa.table(
        {"left_id": [p[0] for p in pairs], "right_id": [p[1] for p in pairs],
         "cosine": pa.array([np.cos(np.pi * (1 - p[2])) for p in pairs], pa.float32()),
         "angular_similarity": pa.array([p[2] for p in pairs], pa.float32()),
         "score": pa.array([p[2] for p in pairs], pa.float32()),
         "model_id": [model_id] * len(pairs), "run_id": [run_id] * len(pairs)},
        schema=outputs.with_lineage(MATCHES_SCHEMA, lineage),
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture
def workdir(tmp_path):
    _write_templates(str(tmp_path / "templates" / "templates-00000-of-00002.parquet"),
                     {k: ITEMS[k] for k in ["z", "c", "a"]})
    _write_templates(str(tmp_path / "templates" / "templates-00001-of-00002.parquet"),
                     {k: ITEMS[k] for k in ["e", "b", "d"]})
    _write_matches(str(tmp_path / "matches" / "matches-00000-of-00001.parquet"), PAIRS)
    return tmp_path


def _argv(d, *extra):
    return ["--templates", str(d / "templates" / "*.parquet"), "--matches", str(d / "matches" / "*.parquet"),
            "--output", str(d), "--run_id", "r2", *extra]


def _rows(d):
    t = read_table_dir(str(d), "clusters").sort_by("item_id")
    link = [None if v is None else round(v, 6) for v in t.column("min_link_similarity").to_pylist()]
    return list(zip(t.column("item_id").to_pylist(), t.column("cluster_id").to_pylist(),
                    t.column("is_keeper").to_pylist(), t.column("cluster_size").to_pylist(), link))


def test_first_id_clusters_exact(workdir):
    summary = dedup.run(_argv(workdir), test_pipeline=test_pipeline.TestPipeline())
    assert _rows(workdir) == [
        ("a", "a", True, 3, 0.9),
        ("b", "a", False, 3, 0.9),
        ("c", "a", False, 3, 0.9),
        ("d", "d", True, 2, 0.7),
        ("e", "d", False, 2, 0.7),
        ("z", "z", True, 1, None),
    ]
    t = read_table_dir(str(workdir), "clusters")
    assert t.column("keeper_id").to_pylist() == t.column("cluster_id").to_pylist()
    assert set(t.column("run_id").to_pylist()) == {"r2"}
    assert summary["clusters_count"] == 2 and summary["items_to_drop"] == 3
    assert summary["clusters"] == os.path.join(str(workdir), "clusters", "clusters-*.parquet")


def test_largest_image_policy(workdir):
    summary = dedup.run(_argv(workdir, "--keeper_policy", "largest_image", "--num_shards", "2"),
                        test_pipeline=test_pipeline.TestPipeline())
    assert [(r[0], r[1], r[2]) for r in _rows(workdir)] == [
        ("a", "b", False), ("b", "b", True), ("c", "b", False), ("d", "e", False), ("e", "e", True),
        ("z", "z", True),
    ]
    assert summary["clusters_count"] == 2 and summary["items_to_drop"] == 3


def test_no_matches_gives_singletons(tmp_path):
    _write_templates(str(tmp_path / "templates" / "t.parquet"), {"a": (1, 1), "b": (1, 1)})
    _write_matches(str(tmp_path / "matches" / "matches-00000-of-00001.parquet"), [])
    summary = dedup.run(_argv(tmp_path), test_pipeline=test_pipeline.TestPipeline())
    assert _rows(tmp_path) == [("a", "a", True, 1, None), ("b", "b", True, 1, None)]
    assert summary["clusters_count"] == 0 and summary["items_to_drop"] == 0


def test_refuses_matches_of_unknown_items_or_other_model(workdir):
    _write_matches(str(workdir / "matches" / "matches-00000-of-00001.parquet"), [("a", "q", 0.9)])
    with pytest.raises(ValueError, match="not among the templates, e.g. 'q'"):
        dedup.run(_argv(workdir))
    _write_matches(str(workdir / "matches" / "matches-00000-of-00001.parquet"), PAIRS, model_id="f" * 16)
    with pytest.raises(ValueError, match="matches come from model"):
        dedup.run(_argv(workdir))


def _arc(fractions):
    t = np.pi * np.asarray(fractions, np.float64)
    return np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)


@pytest.fixture
def chain_dir(tmp_path):
    """a-b-c-d on an arc (neighbours 0.96, 0.95, 0.94; a-c 0.91; a-d 0.85) and a tight pair x-y, matched at 0.9."""
    ids = ["a", "b", "c", "d", "x", "y"]
    vec = _arc([0.0, 0.04, 0.09, 0.15, 0.6, 0.61])
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    table = pa.table(
        {"item_id": ids, "source_uri": [f"/x/{i}.png" for i in ids], "content_sha256": ["0" * 64] * 6,
         "embedding": vec.tolist(), "model_id": [MODEL] * 6, "width": [10] * 6, "height": [10] * 6,
         "embedded_at": [now] * 6, "run_id": ["e"] * 6},
        schema=templates_schema(2),
    )
    os.makedirs(tmp_path / "templates")
    pq.write_table(table, tmp_path / "templates" / "templates-00000-of-00001.parquet")
    _write_matches(str(tmp_path / "matches" / "matches-00000-of-00001.parquet"),
                   [("a", "b", 0.96), ("b", "c", 0.95), ("c", "d", 0.94), ("a", "c", 0.91), ("x", "y", 0.99)],
                   threshold=0.9)
    (tmp_path / "scores.csv").write_text("item_id,score\na,1\nb,7\nc,3\nd,\nx,2\ny,2\n")
    return tmp_path


def _chain_rows(d):
    t = read_table_dir(str(d), "clusters").sort_by("item_id")
    return (t.column("cluster_id").to_pylist(), t.column("is_chained").to_pylist(),
            [round(v, 4) for v in t.column("min_member_similarity").to_pylist()])


def test_chained_cluster_is_flagged_and_column_keeper(chain_dir):
    summary = dedup.run(_argv(chain_dir, "--linkage", "single", "--chain_margin", "0.04", "--keeper_policy", "column",
                              "--keeper_table", str(chain_dir / "scores.csv"), "--keeper_column", "score"),
                        test_pipeline=test_pipeline.TestPipeline())
    clusters, chained, diameter = _chain_rows(chain_dir)
    # threshold 0.9 read from the matches' lineage; a-d at 0.85 < 0.9 - 0.04. Keeper: highest score (b), x/y tie: x.
    assert clusters == ["b", "b", "b", "b", "x", "x"]
    assert chained == [True] * 4 + [False] * 2
    assert diameter == [0.85] * 4 + [0.99] * 2
    assert summary["chained_clusters"] == 1 and summary["threshold"] == 0.9


def test_complete_linkage_splits_chains(chain_dir):
    summary = dedup.run(_argv(chain_dir, "--chain_margin", "0.04", "--linkage", "complete"),
                        test_pipeline=test_pipeline.TestPipeline())
    clusters, chained, diameter = _chain_rows(chain_dir)
    assert clusters == ["a", "a", "c", "c", "x", "x"]
    assert chained == [False] * 6
    assert diameter == [0.96, 0.96, 0.94, 0.94, 0.99, 0.99]
    assert summary["clusters_count"] == 3 and summary["items_to_drop"] == 3 and summary["chained_clusters"] == 0


def test_complete_linkage_is_the_default(chain_dir):
    summary = dedup.run(_argv(chain_dir), test_pipeline=test_pipeline.TestPipeline())
    assert summary["linkage"] == "complete"
    clusters, chained, diameter = _chain_rows(chain_dir)
    # No cluster holds two items that do not match (a-d 0.85 and b-d 0.89 are below 0.9).
    assert clusters == ["a", "a", "c", "c", "x", "x"] and chained == [False] * 6
    assert diameter == [0.96, 0.96, 0.94, 0.94, 0.99, 0.99]


def test_linkage_values_are_defined_by_the_clustering_module():
    import argparse

    from beam_pipeline import clustering
    from beam_pipeline.options import DedupOptions

    parser = argparse.ArgumentParser()
    DedupOptions._add_argparse_args(parser)
    action = parser._option_string_actions["--linkage"]
    assert tuple(action.choices) == clustering.LINKAGES and action.default == clustering.DEFAULT_LINKAGE
    assert tuple(parser._option_string_actions["--keeper_policy"].choices) == clustering.KEEPER_POLICIES
    with pytest.raises(SystemExit):
        parser.parse_args(["--templates", "t", "--matches", "m", "--output", "o", "--linkage", "average"])


def _unit(rng, dim: int = 4) -> list:
    v = rng.normal(size=dim)
    return (v / np.linalg.norm(v)).astype(np.float32).tolist()


def _graph_tables(ids: list, edges: dict, sizes: dict, vectors: dict):
    """(templates, matches) tables in memory for items `ids` ({id: width}, {id: unit vector}) and edges
    {(a, b): similarity}."""
    now = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    templates = pa.table(
        {"item_id": ids, "source_uri": ids, "content_sha256": ["0" * 64] * len(ids),
         "embedding": [vectors[i] for i in ids], "model_id": [MODEL] * len(ids),
         "width": [sizes[i] for i in ids], "height": [10] * len(ids), "embedded_at": [now] * len(ids),
         "run_id": ["e"] * len(ids)}, schema=templates_schema(len(vectors[ids[0]]))).sort_by("item_id")
    pairs = sorted(edges.items())
    sim = np.asarray([s for _, s in pairs], np.float32)
    matches = pa.table({"left_id": [a for (a, _), _ in pairs], "right_id": [b for (_, b), _ in pairs],
                        "cosine": sim, "angular_similarity": sim, "score": sim, "model_id": [MODEL] * len(pairs),
                        "run_id": ["m"] * len(pairs)}, schema=MATCHES_SCHEMA)
    return templates, matches


@pytest.mark.parametrize("linkage,policy", [("complete", "first_id"), ("complete", "largest_image"),
                                            ("single", "largest_image")])
def test_reclustering_the_touched_components_equals_clustering_everything(linkage, policy):
    """A night's changes (items added, changed, removed), then dedup.recluster with the touched items as
    nightly names them: the same table as clustering the whole catalogue again, on 80 random catalogues."""
    from beam_pipeline import clustering

    rng = np.random.default_rng(3)
    config = clustering.ClusterConfig(linkage=linkage, keeper_policy=policy, threshold=0.9)
    partial = 0
    for case in range(80):
        n = int(rng.integers(4, 40))
        ids = [f"i{k:03d}" for k in range(n)]
        sizes = {i: int(rng.integers(1, 5)) for i in ids}
        vectors = {i: _unit(rng) for i in ids}

        def random_edges(nodes, among, count):
            out = {}
            for _ in range(count):
                a, b = rng.choice(nodes), rng.choice(among)
                if a != b:
                    out[tuple(sorted((a, b)))] = float(np.round(rng.uniform(0.9, 1.0), 2))
            return out

        edges = random_edges(ids, ids, int(rng.integers(0, 2 * n)))
        before_t, before_m = _graph_tables(ids, edges, sizes, vectors)
        previous = dedup.cluster_in_process(before_t, before_m, config, "night-1")

        removed = set(rng.choice(ids, size=int(rng.integers(0, 3)), replace=False).tolist())
        changed = set(rng.choice([i for i in ids if i not in removed], size=int(rng.integers(0, 3)),
                                 replace=False).tolist())
        added = [f"n{case}_{k}" for k in range(int(rng.integers(0, 4)))]
        unchanged = [i for i in ids if i not in removed and i not in changed]
        now_ids = sorted(unchanged + sorted(changed) + added)
        sizes.update({i: int(rng.integers(1, 5)) for i in [*changed, *added]})
        vectors.update({i: _unit(rng) for i in [*changed, *added]})
        kept = {e: s for e, s in edges.items() if e[0] in unchanged and e[1] in unchanged}
        night = sorted(changed) + added
        new_edges = random_edges(night, now_ids, 3 * len(night)) if night else {}
        after_t, after_m = _graph_tables(now_ids, {**kept, **new_edges}, sizes, vectors)
        gone = removed | changed
        touched = set(night) | {b if a in gone else a for a, b in edges if (a in gone) != (b in gone)}

        got, reclustered = dedup.recluster(previous, after_t, after_m, touched, config, "night-2")
        want = dedup.cluster_in_process(after_t, after_m, config, "night-2")
        assert got.to_pylist() == want.to_pylist(), case
        partial += reclustered < len(now_ids)
    assert partial > 40  # most nights re-cluster only part of the catalogue


def test_reclustering_refuses_previous_clusters_of_other_items():
    from beam_pipeline import clustering

    rng = np.random.default_rng(0)
    templates, matches = _graph_tables(["a", "b", "c"], {("a", "b"): 0.95}, dict.fromkeys("abc", 1),
                                       {i: _unit(rng) for i in "abc"})
    config = clustering.ClusterConfig(threshold=0.9)
    previous = dedup.cluster_in_process(templates.slice(0, 2), matches, config, "old")
    with pytest.raises(ValueError, match="lack 1 of the 1 untouched items"):
        dedup.recluster(previous, templates, matches, {"a"}, config, "new")
