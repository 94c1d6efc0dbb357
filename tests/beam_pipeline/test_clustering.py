"""Union-find, keeper policies and the weakest link on hand-made graphs, with exact expected outputs."""
import numpy as np
import pytest

from beam_pipeline import clustering
from schemas.tables import validate_table

ITEMS = ["a", "b", "c", "d", "e", "f", "g", "h", "z"]
# {a,b,c}: a triangle whose weakest edge (b-c 0.80) is NOT in the maximum spanning tree (a-c 0.95,
# a-b 0.90), so its weakest link is 0.90. {d,e,f}: a chain, weakest link 0.70. {g,h}: 0.99. z: alone.
EDGES = [("a", "b", 0.90), ("b", "c", 0.80), ("a", "c", 0.95), ("d", "e", 0.70), ("e", "f", 0.85),
         ("g", "h", 0.99)]
SIZES = {"a": (10, 10), "b": (30, 30), "c": (20, 20), "d": (5, 5), "e": (8, 8), "f": (4, 16), "g": (9, 9),
         "h": (9, 9), "z": (1, 1)}


# Oldest: d and f tie on the earliest time in {d,e,f} (d by id); c is the oldest of {a,b,c}.
EMBEDDED_AT = {"a": 5, "b": 3, "c": 1, "d": 2, "e": 9, "f": 2, "g": 7, "h": 6, "z": 0}
# User column: h has none (ranks last); a and c tie on the max of {a,b,c}.
SCORES = {"a": 8.0, "b": 1.0, "c": 8.0, "d": 3.0, "e": 4.0, "f": None, "g": 2.0, "h": None, "z": 5.0}


def _cluster(items=ITEMS, edges=EDGES, policy="first_id", **kwargs):
    left, right, sim = zip(*edges) if edges else ((), (), ())
    return clustering.cluster_items(
        items, list(left), list(right), np.asarray(sim, np.float32), keeper_policy=policy,
        widths=[SIZES[i][0] for i in items], heights=[SIZES[i][1] for i in items],
        embedded_at=[EMBEDDED_AT[i] for i in items], keeper_values=[SCORES[i] for i in items], **kwargs,
    )


def test_union_find():
    uf = clustering.UnionFind(5)
    assert uf.union(0, 1) >= 0 and uf.union(3, 4) >= 0 and uf.union(1, 0) == -1
    assert uf.union(1, 4) >= 0
    roots = uf.roots()
    assert roots[0] == roots[1] == roots[3] == roots[4] != roots[2]


def test_connected_components_labels_and_min_link():
    labels, link = clustering.connected_components(
        6, [1, 4, 2], [3, 5, 1], np.array([0.5, 0.7, 0.9], np.float32)
    )
    assert labels.tolist() == [0, 1, 1, 1, 4, 4]
    assert np.isnan(link[0])
    assert link[1:].tolist() == [np.float32(0.5)] * 3 + [np.float32(0.7)] * 2
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        clustering.connected_components(3, [0], [3])


def test_first_id_policy_exact():
    out = _cluster()
    assert out["item_id"] == ITEMS
    assert out["cluster_id"] == ["a", "a", "a", "d", "d", "d", "g", "g", "z"]
    assert out["keeper_id"] == out["cluster_id"]
    assert out["is_keeper"].tolist() == [True, False, False, True, False, False, True, False, True]
    assert out["cluster_size"].tolist() == [3, 3, 3, 3, 3, 3, 2, 2, 1]
    link = out["min_link_similarity"]
    np.testing.assert_array_equal(link[:8], np.float32([0.90] * 3 + [0.70] * 3 + [0.99] * 2))
    assert np.isnan(link[8])
    assert clustering.summarize(out) == {"items": 9, "clusters_count": 3, "items_to_drop": 5, "largest_cluster": 3,
                                        "chained_clusters": 0}


def test_largest_image_policy_with_ties():
    out = _cluster(policy="largest_image")
    # b is largest of {a,b,c}; e (64) and f (64) tie in {d,e,f}: e by id; g and h tie: g.
    assert out["cluster_id"] == ["b", "b", "b", "e", "e", "e", "g", "g", "z"]
    assert out["is_keeper"].tolist() == [False, True, False, False, True, False, True, False, True]
    with pytest.raises(ValueError, match="needs widths and heights"):
        clustering.cluster_items(ITEMS, [], [], np.zeros(0, np.float32), keeper_policy="largest_image")


def test_oldest_and_column_policies_with_ties():
    out = _cluster(policy="oldest")
    assert out["cluster_id"] == ["c", "c", "c", "d", "d", "d", "h", "h", "z"]
    out = _cluster(policy="column", keeper_order="max")
    assert out["cluster_id"] == ["a", "a", "a", "e", "e", "e", "g", "g", "z"]
    out = _cluster(policy="column", keeper_order="min")  # missing values still rank last
    assert out["cluster_id"] == ["b", "b", "b", "d", "d", "d", "g", "g", "z"]
    with pytest.raises(ValueError, match="needs keeper_values"):
        clustering.cluster_items(ITEMS, [], [], np.zeros(0, np.float32), keeper_policy="column")


def _arc(fractions):
    """Unit vectors on a circle at angles pi * fraction: angular similarity = 1 - |difference|."""
    t = np.pi * np.asarray(fractions, np.float64)
    return np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)


# A chain a-b-c-d: neighbours 0.96, 0.95, 0.94; a-c 0.91 also matches, b-d 0.89 and a-d 0.85 do not. x-y is a
# tight pair elsewhere.
CHAIN_IDS = ["a", "b", "c", "d", "x", "y"]
CHAIN_VEC = dict(zip(CHAIN_IDS, _arc([0.0, 0.04, 0.09, 0.15, 0.6, 0.61])))
CHAIN_EDGES = [("a", "b", 0.96), ("b", "c", 0.95), ("c", "d", 0.94), ("a", "c", 0.91), ("x", "y", 0.99)]


def _chain(**kwargs):
    left, right, sim = zip(*CHAIN_EDGES)
    return clustering.cluster_items(CHAIN_IDS, list(left), list(right), np.float32(sim), embeddings=CHAIN_VEC,
                                    threshold=0.9, chain_margin=0.04, **kwargs)


def test_chains_are_flagged_with_the_smallest_member_similarity():
    out = _chain()
    assert out["cluster_id"] == ["a", "a", "a", "a", "x", "x"]
    np.testing.assert_allclose(out["min_member_similarity"], [0.85] * 4 + [0.99] * 2, atol=1e-5)
    np.testing.assert_allclose(out["min_link_similarity"], [0.94] * 4 + [0.99] * 2, atol=1e-6)
    assert out["is_chained"].tolist() == [True] * 4 + [False] * 2
    assert clustering.summarize(out)["chained_clusters"] == 1
    # A wider margin: 0.85 is within 0.9 - 0.06, not a chain.
    left, right, sim = zip(*CHAIN_EDGES)
    wide = clustering.cluster_items(CHAIN_IDS, list(left), list(right), np.float32(sim), embeddings=CHAIN_VEC,
                                    threshold=0.9, chain_margin=0.06)
    assert not wide["is_chained"].any()
    table = validate_table(clustering.clusters_table(out, "r"), "clusters")
    assert table.column("is_chained").to_pylist() == [True] * 4 + [False] * 2


def test_complete_linkage_splits_the_chain():
    out = _chain(linkage="complete")
    # Complete linkage merges a-b (0.96), then c-d (0.94); {a,b} x {c,d} has a-d at 0.85 < 0.9: stop.
    assert out["cluster_id"] == ["a", "a", "c", "c", "x", "x"]
    assert out["cluster_size"].tolist() == [2] * 6
    np.testing.assert_allclose(out["min_link_similarity"], [0.96, 0.96, 0.94, 0.94, 0.99, 0.99], atol=1e-6)
    assert not out["is_chained"].any()
    with pytest.raises(ValueError, match="needs the members' embeddings"):
        clustering.cluster_items(CHAIN_IDS, ["a"], ["b"], np.float32([0.96]), linkage="complete")
    assert clustering.min_pair_cosine(_arc([0.0, 0.5, 0.25]), rows_per_chunk=2) == pytest.approx(0.0, abs=1e-6)


def test_independent_of_input_order_and_pair_direction():
    rng = np.random.default_rng(0)
    items = list(np.asarray(ITEMS)[rng.permutation(len(ITEMS))])
    edges = [(r, l, s) if k % 2 else (l, r, s) for k, (l, r, s) in enumerate(EDGES)]
    edges = [edges[k] for k in rng.permutation(len(edges))]
    for policy in clustering.KEEPER_POLICIES:  # all four: the helper passes every policy's inputs
        a, b = _cluster(policy=policy), _cluster(items, edges, policy)
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_no_edges_all_singletons_and_empty():
    out = _cluster(edges=[])
    assert out["is_keeper"].all() and out["cluster_id"] == ITEMS and (out["cluster_size"] == 1).all()
    assert np.isnan(out["min_link_similarity"]).all()
    assert clustering.summarize(out)["clusters_count"] == 0
    empty = clustering.cluster_items([], [], [], np.zeros(0, np.float32))
    assert empty["item_id"] == [] and clustering.summarize(empty)["items"] == 0


def test_refusals():
    with pytest.raises(ValueError, match="'q', which is not among the templates"):
        _cluster(edges=[("a", "q", 0.9)])
    with pytest.raises(ValueError, match="itself"):
        _cluster(edges=[("a", "a", 0.9)])
    with pytest.raises(ValueError, match="keeper_policy"):
        _cluster(policy="random")


def test_clusters_table_validates_with_nulls_for_singletons():
    table = validate_table(clustering.clusters_table(_cluster(), "run-1"), "clusters")
    assert table.num_rows == 9
    assert table.column("min_link_similarity").null_count == 1
    assert table.column("min_link_similarity")[8].as_py() is None
    assert table.column("min_link_similarity")[0].as_py() == pytest.approx(0.9)
    assert set(table.column("run_id").to_pylist()) == {"run-1"}
