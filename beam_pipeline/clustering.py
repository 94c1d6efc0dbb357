"""Duplicate clusters from matched pairs: connected components, a keeper per cluster, the weakest link.

Pure Python/NumPy (pyarrow only to build the output table). Items are the nodes, matched pairs the
edges. Edges are taken strongest first (Kruskal on angular similarity, descending) into a union-find,
so the edges that merge two components form a maximum spanning tree of each cluster, and the last
merging edge of a cluster is the minimum edge of that tree: its `min_link_similarity`. That is the
honest weakest link: the cluster stays connected at any threshold up to it and splits above it, whatever
other, stronger edges it has. Every output is independent of input order.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from schemas.tables import CLUSTERS_SCHEMA

KEEPER_POLICIES = ("first_id", "largest_image")


class UnionFind:
    """Disjoint sets over 0..n-1 with union by size and path halving (near-constant time per call)."""

    def __init__(self, n: int):
        self.parent = list(range(int(n)))
        self.size = [1] * int(n)

    def find(self, x: int) -> int:
        """The representative of `x`'s set."""
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        """Merge the sets of `a` and `b`; returns the new representative, or -1 if already one set."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return -1
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return ra

    def roots(self) -> np.ndarray:
        """Representative of every element, int64 (n,)."""
        return np.fromiter((self.find(x) for x in range(len(self.parent))), np.int64, len(self.parent))


def connected_components(
    n: int, i: np.ndarray, j: np.ndarray, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Components of the graph on nodes 0..n-1 with edges (i[k], j[k]) of `weight[k]`.

    Returns (labels int64 (n,): the smallest node of each node's component; min_link float32 (n,):
    per node, the minimum edge weight of its component's maximum spanning tree, NaN for isolated nodes).
    Without `weight` every edge weighs 1.
    """
    i = np.asarray(i, np.int64)
    j = np.asarray(j, np.int64)
    if i.shape != j.shape:
        raise ValueError(f"edge endpoint arrays differ in shape: {i.shape} vs {j.shape}")
    w = np.ones(len(i), np.float32) if weight is None else np.asarray(weight, np.float32)
    if w.shape != i.shape:
        raise ValueError(f"{len(w)} weights for {len(i)} edges")
    if len(i) and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    if np.isnan(w).any():
        raise ValueError("edge weights contain NaN")
    uf = UnionFind(n)
    link = [np.nan] * int(n)
    # Strongest first; ties in any order give the same components and the same minimum tree weight.
    order = np.argsort(-w, kind="stable")
    for a, b, s in zip(i[order].tolist(), j[order].tolist(), w[order].tolist()):
        root = uf.union(a, b)
        if root >= 0:
            link[root] = s  # descending order: this edge is the weakest tree edge so far
    roots = uf.roots()
    # Label = smallest member: np.unique's first index of each root, in ascending node order.
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    labels = first[inverse].astype(np.int64)
    min_link = np.asarray(link, np.float32)[roots]
    return labels, min_link


def cluster_items(
    item_ids: Sequence[str],
    left_ids: Sequence[str],
    right_ids: Sequence[str],
    similarity: np.ndarray,
    *,
    keeper_policy: str = "first_id",
    widths: np.ndarray | None = None,
    heights: np.ndarray | None = None,
) -> dict:
    """Cluster `item_ids` (every template item) by the matched pairs (left_ids[k], right_ids[k]).

    keeper_policy "first_id": the smallest item_id is kept; "largest_image": the largest width*height
    (`widths`, `heights` aligned with `item_ids`), ties by smallest item_id. cluster_id = keeper's id.
    Returns columns sorted by item_id: {"item_id": list[str], "cluster_id": list[str], "is_keeper": bool
    (n,), "keeper_id": list[str], "cluster_size": int32 (n,), "min_link_similarity": float32 (n,), NaN for
    singletons}. Raises ValueError for unknown ids in pairs, self pairs, duplicate item ids, bad policy.
    """
    if keeper_policy not in KEEPER_POLICIES:
        raise ValueError(f"keeper_policy must be one of {KEEPER_POLICIES}, got {keeper_policy!r}")
    ids = np.asarray(list(item_ids), dtype=object)
    order = np.argsort(ids.astype(str), kind="stable") if len(ids) else np.zeros(0, np.int64)
    ids = ids[order]
    n = len(ids)
    index = {item: k for k, item in enumerate(ids.tolist())}
    if len(index) != n:
        raise ValueError("item ids must be unique")
    if len(left_ids) != len(right_ids) or len(left_ids) != len(similarity):
        raise ValueError(f"{len(left_ids)} left ids, {len(right_ids)} right ids, {len(similarity)} similarities")
    try:
        i = np.fromiter((index[x] for x in left_ids), np.int64, len(left_ids))
        j = np.fromiter((index[x] for x in right_ids), np.int64, len(right_ids))
    except KeyError as err:
        raise ValueError(f"matched pair names item {err.args[0]!r}, which is not among the templates") from None
    if (i == j).any():
        k = int(np.flatnonzero(i == j)[0])
        raise ValueError(f"matched pair of item {ids[i[k]]!r} with itself")
    labels, min_link = connected_components(n, i, j, similarity)

    if keeper_policy == "first_id":
        keeper_of = labels  # smallest index = smallest id (ids are sorted)
    else:
        if widths is None or heights is None:
            raise ValueError("keeper_policy 'largest_image' needs widths and heights")
        area = (np.asarray(widths, np.int64) * np.asarray(heights, np.int64))[order]
        if len(area) != n:
            raise ValueError(f"{len(area)} image sizes for {n} items")
        # Within each component: largest area first, then smallest id (index).
        rank = np.lexsort((np.arange(n), -area, labels))
        comp_sorted = labels[rank]
        starts = np.flatnonzero(np.r_[True, comp_sorted[1:] != comp_sorted[:-1]])
        keeper_by_label = dict(zip(comp_sorted[starts].tolist(), rank[starts].tolist()))
        keeper_of = np.fromiter((keeper_by_label[c] for c in labels.tolist()), np.int64, n)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sizes = counts[inverse].astype(np.int32)
    keeper_ids = ids[keeper_of].tolist()
    return {
        "item_id": ids.tolist(),
        "cluster_id": keeper_ids,
        "is_keeper": keeper_of == np.arange(n),
        "keeper_id": keeper_ids,
        "cluster_size": sizes,
        "min_link_similarity": np.where(sizes > 1, min_link, np.float32(np.nan)).astype(np.float32),
    }


def clusters_table(clusters: dict, run_id: str) -> pa.Table:
    """The output of `cluster_items` as a CLUSTERS_SCHEMA table (NaN min links become nulls)."""
    n = len(clusters["item_id"])
    link = np.asarray(clusters["min_link_similarity"], np.float32)
    return pa.table(
        {
            "item_id": pa.array(clusters["item_id"], pa.string()),
            "cluster_id": pa.array(clusters["cluster_id"], pa.string()),
            "is_keeper": pa.array(np.asarray(clusters["is_keeper"], np.bool_)),
            "keeper_id": pa.array(clusters["keeper_id"], pa.string()),
            "cluster_size": pa.array(np.asarray(clusters["cluster_size"], np.int32)),
            "min_link_similarity": pa.array(link, pa.float32(), mask=np.isnan(link)),
            "run_id": pa.array([run_id] * n, pa.string()),
        },
        schema=CLUSTERS_SCHEMA,
    )


def summarize(clusters: dict) -> dict:
    """{"clusters_count": clusters of size >= 2, "items_to_drop": members that are not keepers,
    "items": all items, "largest_cluster": size}."""
    sizes = np.asarray(clusters["cluster_size"])
    keep = np.asarray(clusters["is_keeper"], np.bool_)
    return {
        "items": int(len(sizes)),
        "clusters_count": int(((sizes > 1) & keep).sum()),
        "items_to_drop": int((~keep).sum()),
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
    }
