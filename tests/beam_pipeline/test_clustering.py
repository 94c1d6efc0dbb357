"""Union-find, complete linkage, keeper policies and the weakest link on hand-made graphs, with exact
expected outputs."""
import time

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


def _cluster(items=ITEMS, edges=EDGES, policy="first_id", linkage="single", **settings):
    """Connected components by default here (the keeper and weakest-link tests are written for them);
    complete linkage, the default of cluster_items, has its own tests below."""
    left, right, sim = zip(*edges) if edges else ((), (), ())
    return clustering.cluster_items(
        items, list(left), list(right), np.asarray(sim, np.float32),
        clustering.ClusterConfig(linkage=linkage, keeper_policy=policy, **settings),
        clustering.KeeperColumns(widths=[SIZES[i][0] for i in items], heights=[SIZES[i][1] for i in items],
                                 embedded_at=[EMBEDDED_AT[i] for i in items], values=[SCORES[i] for i in items]),
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
        clustering.cluster_items(ITEMS, [], [], np.zeros(0, np.float32),
                                 clustering.ClusterConfig(keeper_policy="largest_image"))


def test_oldest_and_column_policies_with_ties():
    out = _cluster(policy="oldest")
    assert out["cluster_id"] == ["c", "c", "c", "d", "d", "d", "h", "h", "z"]
    out = _cluster(policy="column", keeper_order="max")
    assert out["cluster_id"] == ["a", "a", "a", "e", "e", "e", "g", "g", "z"]
    out = _cluster(policy="column", keeper_order="min")  # missing values still rank last
    assert out["cluster_id"] == ["b", "b", "b", "d", "d", "d", "g", "g", "z"]
    with pytest.raises(ValueError, match="needs keeper_values"):
        clustering.cluster_items(ITEMS, [], [], np.zeros(0, np.float32),
                                 clustering.ClusterConfig(keeper_policy="column"))


def _arc(fractions):
    """Unit vectors on a circle at angles pi * fraction: angular similarity = 1 - |difference|."""
    t = np.pi * np.asarray(fractions, np.float64)
    return np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)


# A chain a-b-c-d: neighbours 0.96, 0.95, 0.94; a-c 0.91 also matches, b-d 0.89 and a-d 0.85 do not. x-y is a
# tight pair elsewhere.
CHAIN_IDS = ["a", "b", "c", "d", "x", "y"]
CHAIN_VEC = dict(zip(CHAIN_IDS, _arc([0.0, 0.04, 0.09, 0.15, 0.6, 0.61])))
CHAIN_EDGES = [("a", "b", 0.96), ("b", "c", 0.95), ("c", "d", 0.94), ("a", "c", 0.91), ("x", "y", 0.99)]


def _chain(**settings):
    left, right, sim = zip(*CHAIN_EDGES)
    return clustering.cluster_items(CHAIN_IDS, list(left), list(right), np.float32(sim),
                                    clustering.ClusterConfig(threshold=0.9, chain_margin=0.04, **settings),
                                    embeddings=CHAIN_VEC)


def test_chains_are_flagged_with_the_smallest_member_similarity():
    out = _chain(linkage="single")
    assert out["cluster_id"] == ["a", "a", "a", "a", "x", "x"]
    np.testing.assert_allclose(out["min_member_similarity"], [0.85] * 4 + [0.99] * 2, atol=1e-5)
    np.testing.assert_allclose(out["min_link_similarity"], [0.94] * 4 + [0.99] * 2, atol=1e-6)
    assert out["is_chained"].tolist() == [True] * 4 + [False] * 2
    assert clustering.summarize(out)["chained_clusters"] == 1
    # A wider margin: 0.85 is within 0.9 - 0.06, not a chain.
    left, right, sim = zip(*CHAIN_EDGES)
    wide = clustering.cluster_items(CHAIN_IDS, list(left), list(right), np.float32(sim),
                                    clustering.ClusterConfig(threshold=0.9, chain_margin=0.06, linkage="single"),
                                    embeddings=CHAIN_VEC)
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
    # The default, and from the matches alone: no embeddings needed, the weakest pair read exactly.
    assert clustering.DEFAULT_LINKAGE == "complete"
    left, right, sim = zip(*CHAIN_EDGES)
    bare = clustering.cluster_items(CHAIN_IDS, list(left), list(right), np.float32(sim),
                                    clustering.ClusterConfig(threshold=0.9))
    for key in out:
        np.testing.assert_array_equal(np.asarray(bare[key]), np.asarray(out[key]))
    np.testing.assert_allclose(out["min_member_similarity"], [0.96, 0.96, 0.94, 0.94, 0.99, 0.99], atol=1e-6)
    assert clustering.min_pair_cosine(_arc([0.0, 0.5, 0.25]), rows_per_chunk=2) == pytest.approx(0.0, abs=1e-6)


def test_independent_of_input_order_and_pair_direction():
    rng = np.random.default_rng(0)
    items = list(np.asarray(ITEMS)[rng.permutation(len(ITEMS))])
    edges = [(r, l, s) if k % 2 else (l, r, s) for k, (l, r, s) in enumerate(EDGES)]
    edges = [edges[k] for k in rng.permutation(len(edges))]
    for linkage in clustering.LINKAGES:
        for policy in clustering.KEEPER_POLICIES:  # all four: the helper passes every policy's inputs
            a, b = _cluster(policy=policy, linkage=linkage), _cluster(items, edges, policy, linkage=linkage)
            for key in a:
                np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_complete_linkage_on_the_hand_made_graph():
    out = _cluster(linkage="complete")
    # {a,b,c} is a triangle (every two match): kept whole. {d,e,f} is a chain (d-f not matched): e-f (0.85)
    # merge, d stays alone. g-h, z unchanged.
    assert out["cluster_id"] == ["a", "a", "a", "d", "e", "e", "g", "g", "z"]
    assert out["cluster_size"].tolist() == [3, 3, 3, 1, 2, 2, 2, 2, 1]
    np.testing.assert_array_equal(out["min_link_similarity"][[0, 1, 2, 4, 5, 6, 7]],
                                  np.float32([0.90] * 3 + [0.85] * 2 + [0.99] * 2))
    # Every pair of a cluster is matched, so its weakest pair comes from the matches, exactly.
    np.testing.assert_array_equal(out["min_member_similarity"][[0, 1, 2, 4, 5, 6, 7]],
                                  np.float32([0.80] * 3 + [0.85] * 2 + [0.99] * 2))
    assert np.isnan(out["min_member_similarity"][[3, 8]]).all() and not out["is_chained"].any()
    # The default.
    left, right, sim = zip(*EDGES)
    default = clustering.cluster_items(ITEMS, list(left), list(right), np.float32(sim))
    assert default["cluster_id"] == out["cluster_id"]
    # Pairs below the threshold do not match: a-b (0.90) and b-c (0.80) fall out at 0.92, leaving a-c.
    high = _cluster(linkage="complete", threshold=0.92)
    assert high["cluster_id"] == ["a", "b", "a", "d", "e", "f", "g", "g", "z"]
    with pytest.raises(ValueError, match="linkage must be one of"):
        _cluster(linkage="average")


def _pairs_inside(out):
    """Unordered pairs of items sharing a cluster."""
    members = {}
    for item, cluster in zip(out["item_id"], out["cluster_id"]):
        members.setdefault(cluster, []).append(item)
    return {(a, b) for m in members.values() for k, a in enumerate(m) for b in m[k + 1:]}


def test_a_chain_is_one_cluster_under_single_and_never_under_complete():
    # 40 items on an arc, each matching only its two neighbours (similarity 0.95 .. 0.97, no two alike);
    # items two steps apart are 0.90 or less: below the threshold 0.93.
    n = 40
    ids = [f"p{k:02d}" for k in range(n)]
    gaps = np.linspace(0.03, 0.05, n - 1)[np.random.default_rng(1).permutation(n - 1)]
    vectors = dict(zip(ids, _arc(np.r_[0.0, np.cumsum(gaps)])))
    left, right = ids[:-1], ids[1:]
    sim = np.float32(1 - gaps)
    matched = {(a, b) for a, b in zip(left, right)}
    single = clustering.cluster_items(ids, left, right, sim, clustering.ClusterConfig(threshold=0.93, linkage="single"),
                                      embeddings=vectors)
    assert set(single["cluster_id"]) == {"p00"} and single["is_chained"].all()
    assert len(_pairs_inside(single) - matched) == n * (n - 1) // 2 - (n - 1)  # 741 pairs that do not match
    complete = clustering.cluster_items(ids, left, right, sim, clustering.ClusterConfig(threshold=0.93))
    assert _pairs_inside(complete) - matched == set()  # no member-to-member pair that does not match
    assert complete["cluster_size"].max() == 2 and not complete["is_chained"].any()
    assert clustering.summarize(complete)["clusters_count"] >= n // 3  # a matching of the path, not nothing


def _canonical(labels):
    groups = {}
    for node, label in enumerate(np.asarray(labels).tolist()):
        groups.setdefault(label, []).append(node)
    return sorted(groups.values())


def test_complete_linkage_equals_scipy_on_random_dense_inputs():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    rng = np.random.default_rng(7)
    for _ in range(40):
        n = int(rng.integers(2, 30))
        x = rng.normal(size=(n, 3))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        sim = 1 - np.arccos(np.clip(x @ x.T, -1, 1)) / np.pi
        iu = np.triu_indices(n, 1)
        t = float(np.quantile(sim[iu], rng.uniform(0.4, 0.95)))
        keep = sim[iu] >= t
        ours = clustering.complete_linkage_labels(n, iu[0][keep], iu[1][keep], np.float32(sim[iu][keep]), t)
        dist = 1 - sim
        np.fill_diagonal(dist, 0)
        ref = fcluster(linkage(squareform(dist, checks=False), "complete"), t=1 - t + 1e-7, criterion="distance")
        assert _canonical(ours) == _canonical(ref)
        # Labels are the smallest member of each cluster.
        assert all(ours[g[0]] == g[0] for g in _canonical(ours))


def test_complete_linkage_ties_duplicates_and_validity_on_random_graphs():
    # a-b and b-c tie at 0.95, a-c does not match: the pair with the smaller members (a, b) merges first.
    assert clustering.complete_linkage_labels(3, [1, 0], [2, 1], np.float32([0.95, 0.95])).tolist() == [0, 0, 2]
    assert clustering.complete_linkage_labels(3, [2, 1], [1, 0], np.float32([0.95, 0.95])).tolist() == [0, 0, 2]
    # A pair listed twice (both directions) is one pair: {a,b} x {c} has b-c only, not full.
    assert clustering.complete_linkage_labels(3, [0, 1, 1], [1, 0, 2], np.float32([0.99, 0.99, 0.97])).tolist() \
        == [0, 0, 2]
    # float32 storage a hair under the threshold still matches; clearly below does not.
    assert clustering.complete_linkage_labels(2, [0], [1], np.float32([0.9 - 5e-7]), 0.9).tolist() == [0, 0]
    assert clustering.complete_linkage_labels(2, [0], [1], np.float32([0.89]), 0.9).tolist() == [0, 1]
    with pytest.raises(ValueError, match="itself"):
        clustering.complete_linkage_labels(2, [0], [0], np.float32([0.9]))
    # Random graphs with many ties (similarities on a coarse grid): whatever the order and direction of the
    # pairs, the same clusters; every cluster is a clique of matches and no two clusters could merge.
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(3, 40))
        iu = np.triu_indices(n, 1)
        keep = rng.random(len(iu[0])) < rng.uniform(0.1, 0.6)
        i, j = iu[0][keep], iu[1][keep]
        sim = np.float32(rng.choice([0.91, 0.93, 0.95], len(i)))
        labels = clustering.complete_linkage_labels(n, i, j, sim, 0.9)
        perm = rng.permutation(len(i))
        flip = rng.random(len(i)) < 0.5
        again = clustering.complete_linkage_labels(n, np.where(flip, j, i)[perm], np.where(flip, i, j)[perm],
                                                   sim[perm], 0.9)
        np.testing.assert_array_equal(labels, again)
        edges = set(zip(i.tolist(), j.tolist()))
        groups = _canonical(labels)
        for g in groups:
            assert all((a, b) in edges for k, a in enumerate(g) for b in g[k + 1:])
        for x in range(len(groups)):
            for y in range(x + 1, len(groups)):
                assert not all((min(a, b), max(a, b)) in edges for a in groups[x] for b in groups[y])


def test_complete_linkage_splits_a_large_component_in_bounded_time():
    # 12,000 items in one connected component (each matches its 3 nearest on either side of a line): more
    # than any member-by-member matrix would hold comfortably; the old embedding-based split left
    # components above 5,000 members whole. The matches alone split it, in about the time of the edges.
    n = 12_000
    ids = [f"q{k:05d}" for k in range(n)]
    pos = np.sort(np.random.default_rng(5).uniform(0, 1, n))
    i = np.concatenate([np.arange(n - d) for d in (1, 2, 3)])
    j = np.concatenate([np.arange(d, n) for d in (1, 2, 3)])
    sim = np.float32(1 - (pos[j] - pos[i]) * 1e-3)
    assert len(np.unique(clustering.connected_components(n, i, j)[0])) == 1
    started = time.perf_counter()
    out = clustering.cluster_items(ids, [ids[k] for k in i], [ids[k] for k in j], sim)
    seconds = time.perf_counter() - started
    assert out["cluster_size"].max() <= 4 and not out["is_chained"].any()
    assert seconds < 30  # measured ~0.2 s; generous for loaded CI machines


def test_no_edges_all_singletons_and_empty():
    out = _cluster(edges=[])
    assert out["is_keeper"].all() and out["cluster_id"] == ITEMS and (out["cluster_size"] == 1).all()
    assert np.isnan(out["min_link_similarity"]).all()
    assert clustering.summarize(out)["clusters_count"] == 0
    empty = clustering.cluster_items([], [], [], np.zeros(0, np.float32))
    assert empty["item_id"] == [] and clustering.summarize(empty)["items"] == 0


def test_empty_catalogue_under_every_keeper_policy():
    # Policies that rank by a column had no keeper to index on zero items (an IndexError).
    columns = clustering.KeeperColumns(widths=[], heights=[], embedded_at=[], values=[])
    for policy in clustering.KEEPER_POLICIES:
        empty = clustering.cluster_items([], [], [], np.zeros(0, np.float32),
                                         clustering.ClusterConfig(keeper_policy=policy), columns)
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
