"""Duplicate clusters from matched pairs: complete linkage (default) or connected components, a keeper per
cluster, the weakest link.

Pure Python/NumPy (pyarrow only to build the output table). Items are the nodes, matched pairs the
edges. Complete linkage (`complete_linkage_labels`, the default) merges clusters strongest first only
while every two members of the union are a matched pair, so no cluster holds two items that do not
match; it works on the matched pairs alone, in O(E log E) for a component of E pairs. Single linkage
(connected components) is kept as an option: on a real catalogue it chains near-duplicates of
near-duplicates into a few huge clusters, which `is_chained` flags.
Weakest link: edges are taken strongest first (Kruskal on angular similarity, descending) into a
union-find, so the edges that merge two components form a maximum spanning tree of each cluster, and the
last merging edge of a cluster is the minimum edge of that tree: its `min_link_similarity`. That is the
honest weakest link: the cluster stays connected at any threshold up to it and splits above it, whatever
other, stronger edges it has. Every output is independent of input order.
The parts are small and interchangeable: linkage rules (LINKAGE_RULES, name -> labels function),
weakest links and pairs (`weakest_links`, `weakest_pairs`), chain flags (`chain_flags`), keeper policies
(KEEPER_KEYS, name -> rank key); `cluster_items` composes them as a ClusterConfig says. The tables' names
are the valid --linkage and --keeper_policy values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import pyarrow as pa

from schemas.tables import CLUSTERS_SCHEMA

# Matched pairs stored as float32 can sit a hair under the threshold they were matched at.
MATCH_TOLERANCE = 1e-6


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


def _rank_keys(values: Sequence, order: str) -> np.ndarray:
    """Values of a keeper column -> float64 rank keys, smaller = kept first; missing values rank last."""
    vals = list(values)
    present = [k for k, v in enumerate(vals) if v is not None and not (isinstance(v, float) and np.isnan(v))]
    keys = np.full(len(vals), np.inf)
    if present:
        # Rank by sorted distinct values: works for numbers, strings and timestamps alike.
        uniq, inverse = np.unique(np.asarray([vals[k] for k in present]), return_inverse=True)
        ranks = inverse.astype(np.float64)
        keys[present] = -ranks if order == "max" else ranks
    return keys


def _keepers(labels: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Per node, the index of its cluster's keeper: smallest `key`, ties by smallest index (= item_id)."""
    n = len(labels)
    if n == 0:  # an empty catalogue: no clusters, no keepers
        return np.zeros(0, np.int64)
    rank = np.lexsort((np.arange(n), key, labels))
    comp_sorted = labels[rank]
    starts = np.flatnonzero(np.r_[True, comp_sorted[1:] != comp_sorted[:-1]])
    keeper_by_label = np.zeros(n, np.int64)
    keeper_by_label[comp_sorted[starts]] = rank[starts]
    return keeper_by_label[labels]


def min_pair_cosine(x: np.ndarray, rows_per_chunk: int = 1024) -> float:
    """Smallest cosine between two different rows of unit `x` (s, d), s >= 2, in row chunks (O(chunk * s))."""
    x = np.ascontiguousarray(x, np.float32)
    s = len(x)
    best = np.inf
    for a in range(0, s, rows_per_chunk):
        b = min(s, a + rows_per_chunk)
        sims = x[a:b] @ x.T
        sims[np.arange(b - a), np.arange(a, b)] = np.inf  # not with itself
        best = min(best, float(sims.min()))
    return best


def _oriented_unique_edges(n: int, i: np.ndarray, j: np.ndarray, sim: np.ndarray) -> tuple:
    """Edges oriented (smaller node first), one per node pair (its strongest), in no particular order:
    (a int64, b int64, s float32). One sort of an int64 pair key."""
    a, b = np.minimum(i, j), np.maximum(i, j)
    if len(a) < 2:
        return a, b, sim
    key = a * np.int64(n) + b
    order = np.argsort(key)
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    if len(starts) == len(key):
        return a, b, sim
    return a[order][starts], b[order][starts], np.maximum.reduceat(sim[order], starts)


def _greedy_complete_linkage(a: list, b: list, s: list) -> dict:
    """Greedy complete linkage of the graph given as edges sorted by (-s, a, b).

    Clusters are merged strongest first; two clusters may merge only when every cross pair is an edge
    (their complete-linkage similarity is then the smallest cross edge). Adjacency between clusters is
    kept as {neighbour: [cross edge count, smallest cross edge]} with one shared record per cluster
    pair; a merge iterates the smaller adjacency only, and only neighbours of both merged clusters can be
    fully linked to the new one. Ties: the pair of clusters whose (smaller, larger) smallest members come
    first. Returns {node: smallest member of its cluster} for every node of the edges."""
    import heapq

    adj: dict = {}
    for x, y, w in zip(a, b, s):
        rec = [1, w]
        adj.setdefault(x, {})[y] = rec
        adj.setdefault(y, {})[x] = rec
    size = dict.fromkeys(adj, 1)
    low = {x: x for x in adj}  # smallest member of each live cluster (keyed by its representative)
    parent = {x: x for x in adj}
    heap: list = []  # (-similarity, low, high, rep, rep) of fully linked pairs formed by a merge
    k, m = 0, len(a)
    while True:
        # Next candidate: the better of the next initial edge (singletons) and the heap's top.
        while k < m and not (parent[a[k]] == a[k] and parent[b[k]] == b[k] and size[a[k]] == 1 == size[b[k]]):
            k += 1
        while heap:
            w, lo, hi, x, y = heap[0]
            rec = adj[x].get(y) if parent[x] == x and parent[y] == y else None
            if rec is not None and rec[1] == -w and rec[0] == size[x] * size[y] and \
                    (lo, hi) == (min(low[x], low[y]), max(low[x], low[y])):
                break
            heapq.heappop(heap)  # stale: a side merged since, or no longer fully linked
        if k < m and (not heap or (-s[k], a[k], b[k]) < heap[0][:3]):
            x, y = a[k], b[k]
            k += 1
        elif heap:
            x, y = heapq.heappop(heap)[3:]
        else:
            break
        if len(adj[x]) < len(adj[y]):
            x, y = y, x  # x absorbs y; iterate y's (smaller) adjacency
        del adj[x][y], adj[y][x]
        size[x] += size.pop(y)
        low[x] = min(low[x], low.pop(y))
        parent[y] = x
        for z, rec_yz in adj.pop(y).items():
            del adj[z][y]
            rec_xz = adj[x].get(z)
            if rec_xz is None:
                adj[x][z] = rec_yz
                adj[z][x] = rec_yz
                continue
            rec_xz[0] += rec_yz[0]
            if rec_yz[1] < rec_xz[1]:
                rec_xz[1] = rec_yz[1]
            if rec_xz[0] == size[x] * size[z]:
                heapq.heappush(heap, (-rec_xz[1], min(low[x], low[z]), max(low[x], low[z]), x, z))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    return {x: low[root(x)] for x in parent}


def component_labels(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components of nodes 0..n-1 by the edges (i[k], j[k]) (int64), in compiled code
    (scipy.sparse.csgraph, not a Python loop): int64 (n,), the smallest node of each node's component."""
    if not len(i):
        return np.arange(n, dtype=np.int64)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as csgraph_components

    # int32 ones: a pair listed many times sums to a count, never to an (edge-dropping) zero.
    _, raw = csgraph_components(coo_matrix((np.ones(len(i), np.int32), (i, j)), shape=(n, n)), directed=False)
    comp_low = np.full(int(raw.max()) + 1, n, np.int64)
    np.minimum.at(comp_low, raw, np.arange(n, dtype=np.int64))
    return comp_low[raw]


def complete_linkage_labels(
    n: int, i: np.ndarray, j: np.ndarray, similarity: np.ndarray, threshold: float | None = None
) -> np.ndarray:
    """Complete-linkage clusters of nodes 0..n-1 from the matched pairs (i[k], j[k]) alone.

    Two items "match" when their pair is an edge with similarity >= `threshold` (less a tolerance of
    MATCH_TOLERANCE for float32 storage; None: every edge). Clusters are merged strongest first, and
    only when every two members of the union match, so every two members of a returned cluster match
    each other: agglomerative complete linkage cut at the threshold, with unmatched pairs as infinitely
    far. Ties merge the pair of clusters whose (smaller, larger) smallest members come first, so the
    result depends only on the edges and the node numbering (the callers number items in id order).
    Cost: components that are already cliques are taken whole (O(edges)); others run a greedy merge in
    O(E log E) time and O(E) memory for a component of E matched pairs: no member-by-member matrix.
    Labels int64 (n,): the smallest node of each node's cluster.
    """
    i = np.asarray(i, np.int64)
    j = np.asarray(j, np.int64)
    sim = np.asarray(similarity, np.float32)
    if not (i.shape == j.shape == sim.shape):
        raise ValueError(f"edge arrays differ in shape: {i.shape}, {j.shape}, {sim.shape}")
    if len(i) and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n})")
    if (i == j).any():
        raise ValueError("edge of a node with itself")
    if np.isnan(sim).any():
        raise ValueError("edge weights contain NaN")
    if threshold is not None:
        keep = sim >= np.float32(threshold - MATCH_TOLERANCE)
        i, j, sim = i[keep], j[keep], sim[keep]
    a, b, s = _oriented_unique_edges(n, i, j, sim)
    if not len(a):
        return np.arange(n, dtype=np.int64)
    comp = component_labels(n, a, b)  # smallest member of each node's component
    labels = comp.copy()  # cliques (most components: pairs) stay whole; the others are overwritten below
    comp_size = np.bincount(comp, minlength=n).astype(np.int64)
    comp_edges = np.bincount(comp[a], minlength=n).astype(np.int64)
    clique = comp_edges == comp_size * (comp_size - 1) // 2  # every two members match: one cluster
    rest = ~clique[comp[a]]
    if not rest.any():
        return labels
    a, b, s = a[rest], b[rest], s[rest]
    # Strongest first, ties by (smaller node, larger node); merges never cross components, so one pass
    # serves all the components that are not cliques.
    order = np.lexsort((b, a, -s))
    for node, label in _greedy_complete_linkage(a[order].tolist(), b[order].tolist(), s[order].tolist()).items():
        labels[node] = label
    return labels


def _groups(labels: np.ndarray, wanted: np.ndarray) -> list:
    """Members (sorted node indices) of each label in `wanted`, in one sort (not a scan per label)."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, wanted, side="left")
    ends = np.searchsorted(sorted_labels, wanted, side="right")
    return [order[lo:hi] for lo, hi in zip(starts.tolist(), ends.tolist())]


def single_linkage_labels(n: int, i: np.ndarray, j: np.ndarray, similarity: np.ndarray | None = None,
                          threshold: float | None = None) -> np.ndarray:
    """Single linkage: the connected components of nodes 0..n-1 by every given pair (i[k], j[k]), whatever
    its similarity (`similarity` and `threshold` unused: each pair joins its two items).
    Labels int64 (n,): the smallest node of each node's component."""
    return component_labels(n, np.asarray(i, np.int64), np.asarray(j, np.int64))


class LinkageRule(NamedTuple):
    """A linkage rule: who is clustered with whom, and what that guarantees."""

    # (n, i, j, similarity, threshold) -> int64 (n,): the smallest node of each node's cluster.
    labels: Callable[..., np.ndarray]
    # Every two members of a cluster are a matched pair: no chains, the weakest pair read from the matches.
    members_all_match: bool


# The linkage rules. Their names are the valid --linkage values (options.DedupOptions, nightly, demo and
# report read LINKAGES from here); the default is complete, so that no two members of a cluster fail to
# match (single linkage chains whole catalogues into one cluster).
LINKAGE_RULES = {
    "complete": LinkageRule(complete_linkage_labels, members_all_match=True),
    "single": LinkageRule(single_linkage_labels, members_all_match=False),
}
LINKAGES = tuple(LINKAGE_RULES)
DEFAULT_LINKAGE = "complete"


def weakest_links(n: int, i: np.ndarray, j: np.ndarray, similarity: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per node, the weakest link of its cluster (`labels` int64 (n,), each cluster connected by its
    pairs): the minimum of the maximum spanning tree of the pairs (i[k], j[k]) inside the cluster, angular.
    float32 (n,), NaN for a node alone."""
    inside = labels[i] == labels[j]
    return connected_components(n, i[inside], j[inside], similarity[inside])[1]


def weakest_pairs(n: int, i: np.ndarray, j: np.ndarray, similarity: np.ndarray, labels: np.ndarray,
                  threshold: float | None) -> np.ndarray:
    """Per node, the weakest matched pair inside its cluster (pairs of float32 `similarity` at or above
    `threshold`, None: every pair): the cluster's weakest pair where every two members match.
    float32 (n,), NaN for a node alone."""
    matching = np.ones(len(similarity), np.bool_) if threshold is None else \
        similarity >= np.float32(threshold - MATCH_TOLERANCE)
    inside = (labels[i] == labels[j]) & matching
    weakest = np.full(n, np.inf, np.float32)
    np.minimum.at(weakest, labels[i[inside]], similarity[inside])
    return np.where(np.isfinite(weakest[labels]), weakest[labels], np.float32(np.nan)).astype(np.float32)


def chain_flags(ids: np.ndarray, labels: np.ndarray, sizes: np.ndarray, embeddings: dict | None,
                threshold: float | None, chain_margin: float, max_members: int) -> tuple[np.ndarray, np.ndarray]:
    """Weakest pairs measured by embeddings, and chains, for clusters whose linkage does not bound them.

    `ids` object (n,) the items in node order, `labels` / `sizes` (n,) each node's cluster and its size,
    `embeddings` {item_id: unit vector} for at least every clustered item (None: nothing measured).
    Per cluster of 2+ members: the smallest angular similarity between two of its members (on a
    deterministic sample of `max_members` members for larger clusters: then an upper bound), and
    chained when that is below `threshold - chain_margin` (angular): members far below the threshold from
    each other, held together only by a chain of links.
    Returns (min_member float32 (n,), NaN where not measured; chained bool (n,)).
    """
    n = len(labels)
    min_member = np.full(n, np.nan, np.float32)
    chained = np.zeros(n, np.bool_)
    if embeddings is None:
        return min_member, chained
    from siamese_core.similarity import angular_similarity

    multi = np.unique(labels[sizes > 1])
    for members in _groups(labels, multi):
        if len(members) > max_members:
            rng = np.random.default_rng(len(members))
            members_measured = np.sort(rng.choice(members, max_members, replace=False))
        else:
            members_measured = members
        try:
            x = np.stack([np.asarray(embeddings[ids[m]], np.float32) for m in members_measured.tolist()])
        except KeyError as err:
            raise ValueError(f"no embedding for clustered item {err.args[0]!r}") from None
        value = float(angular_similarity(min_pair_cosine(x)))
        min_member[members] = value
        if threshold is not None and value < threshold - chain_margin:
            chained[members] = True
    return min_member, chained


@dataclass(frozen=True)
class KeeperColumns:
    """Per-item inputs of the keeper policies, aligned with the item ids (None: not given)."""

    widths: Sequence | None = None  # pixels
    heights: Sequence | None = None  # pixels
    embedded_at: Sequence | None = None  # when each item was embedded (any comparable values)
    values: Sequence | None = None  # a user column to rank by; None / NaN entries rank last


# --keeper_order values: keeper_policy "column" keeps the largest (max) or smallest (min) value.
KEEPER_ORDERS = ("max", "min")


def first_id_key(columns: KeeperColumns, keeper_order: str) -> None:
    """Keep the smallest item_id: no key (each cluster's label is its smallest member already)."""
    return None


def largest_image_key(columns: KeeperColumns, keeper_order: str) -> np.ndarray:
    """Keep the largest width * height: key float64 (n,) = -pixels."""
    if columns.widths is None or columns.heights is None:
        raise ValueError("keeper_policy 'largest_image' needs widths and heights")
    per_item = np.asarray(columns.widths, np.int64) * np.asarray(columns.heights, np.int64)
    return -per_item.astype(np.float64)


def oldest_key(columns: KeeperColumns, keeper_order: str) -> np.ndarray:
    """Keep the earliest embedded_at: key float64 (n,) = rank of the time, missing last."""
    if columns.embedded_at is None:
        raise ValueError("keeper_policy 'oldest' needs embedded_at")
    return _rank_keys(list(columns.embedded_at), "min")


def column_key(columns: KeeperColumns, keeper_order: str) -> np.ndarray:
    """Keep the largest (`keeper_order` "max") or smallest ("min") of `values`: key float64 (n,), missing last."""
    if columns.values is None:
        raise ValueError("keeper_policy 'column' needs keeper_values")
    if keeper_order not in KEEPER_ORDERS:
        raise ValueError(f"keeper_order must be 'max' or 'min', got {keeper_order!r}")
    return _rank_keys(list(columns.values), keeper_order)


# The keeper policies, each (columns, keeper_order) -> rank key per item (float64 (n,) aligned with the item
# ids, smaller kept first; ties: smallest item_id) or None for the smallest item_id. Their names are the
# valid --keeper_policy values (options.DedupOptions reads KEEPER_POLICIES from here).
KEEPER_KEYS = {"first_id": first_id_key, "largest_image": largest_image_key, "oldest": oldest_key,
               "column": column_key}
KEEPER_POLICIES = tuple(KEEPER_KEYS)
DEFAULT_KEEPER_POLICY = "first_id"


def keepers(labels: np.ndarray, order: np.ndarray, key: np.ndarray | None) -> np.ndarray:
    """Per node, the node of its cluster's keeper: int64 (n,). `labels` (n,) in node (= id) order, `order`
    (n,) the input position of each node, `key` a keeper policy's key in input order (None: the label)."""
    if key is None:
        return labels  # smallest index = smallest id (nodes are numbered in id order)
    n = len(labels)
    if len(key) != n:
        raise ValueError(f"{len(key)} keeper values for {n} items")
    return _keepers(labels, np.asarray(key, np.float64)[order])


@dataclass(frozen=True)
class ClusterConfig:
    """The settings of a clustering: dedup's flags of the same names (options.DedupOptions reads the
    defaults from here)."""

    linkage: str = DEFAULT_LINKAGE  # a LINKAGE_RULES name
    keeper_policy: str = DEFAULT_KEEPER_POLICY  # a KEEPER_KEYS name
    keeper_order: str = "max"  # keeper_policy "column": one of KEEPER_ORDERS
    threshold: float | None = None  # angular similarity at which pairs match; None: the weakest pair
    chain_margin: float = 0.05  # single linkage: flag clusters with two members this far below the threshold
    max_diameter_members: int = 20_000  # single linkage: measure larger clusters on a sample of this many

    def __post_init__(self):
        if self.keeper_policy not in KEEPER_POLICIES:
            raise ValueError(f"keeper_policy must be one of {KEEPER_POLICIES}, got {self.keeper_policy!r}")
        if self.linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {self.linkage!r}")


def index_pairs(item_ids: Sequence[str], left_ids: Sequence[str], right_ids: Sequence[str],
                similarity: np.ndarray) -> tuple:
    """Number the items in id order and the pairs by those numbers.

    Returns (ids object (n,) sorted, order int64 (n,) the input position of each, i int64 (m,), j int64 (m,),
    sim float32 (m,)). Raises ValueError for duplicate item ids, unknown ids in pairs, self pairs and
    arrays of different lengths.
    """
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
    return ids, order, i, j, np.asarray(similarity, np.float32)


def cluster_items(
    item_ids: Sequence[str],
    left_ids: Sequence[str],
    right_ids: Sequence[str],
    similarity: np.ndarray,
    config: ClusterConfig = ClusterConfig(),
    columns: KeeperColumns = KeeperColumns(),
    embeddings: dict | None = None,
) -> dict:
    """Cluster `item_ids` (every template item) by the matched pairs (left_ids[k], right_ids[k]) of angular
    `similarity[k]`: `index_pairs`, the linkage rule `config.linkage`, `weakest_links`, `weakest_pairs` or
    `chain_flags`, the keeper policy `config.keeper_policy`.

    `linkage="complete"` (default, `complete_linkage_labels`): every two members of a cluster are a matched pair
    at or above `config.threshold` (default: the weakest pair), so nothing is grouped on the strength of a
    chain; `min_member_similarity` is then the cluster's weakest pair, exact, from the matches (no
    embeddings needed) and `is_chained` is never set.
    `linkage="single"` (`single_linkage_labels`): clusters are the connected components of the matches; with
    `embeddings` ({item_id: unit vector} for at least every matched item), every cluster records
    `min_member_similarity` and `is_chained` (`chain_flags`, with `config.chain_margin` and
    `config.max_diameter_members`).
    Keeper (ties: smallest item_id; cluster_id = keeper's id): "first_id" the smallest item_id;
    "largest_image" the largest width*height; "oldest" the earliest `embedded_at`; "column" the largest
    (`keeper_order="max"`) or smallest value of `columns.values` (missing values last). `columns` are
    aligned with `item_ids`.
    Returns columns sorted by item_id: {"item_id", "cluster_id", "is_keeper" bool (n,), "keeper_id",
    "cluster_size" int32 (n,), "min_link_similarity" float32 (n,) (NaN for singletons),
    "min_member_similarity" float32 (n,) (NaN if singleton or not measured), "is_chained" bool (n,)}.
    Every output is independent of the order of items and pairs and of pair direction.
    Raises ValueError for unknown ids in pairs, self pairs, duplicate item ids, missing keeper inputs.
    """
    ids, order, i, j, sim = index_pairs(item_ids, left_ids, right_ids, similarity)
    n = len(ids)
    threshold = config.threshold
    if threshold is None and len(sim):
        threshold = float(sim.min())
    rule = LINKAGE_RULES[config.linkage]
    labels = rule.labels(n, i, j, sim, threshold)
    min_link = weakest_links(n, i, j, sim, labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sizes = counts[inverse]
    if rule.members_all_match:
        min_member, chained = weakest_pairs(n, i, j, sim, labels, threshold), np.zeros(n, np.bool_)
    else:  # members may be far apart: measure them by their embeddings, flag chains
        min_member, chained = chain_flags(ids, labels, sizes, embeddings, threshold, config.chain_margin,
                                          config.max_diameter_members)
    keeper_of = keepers(labels, order, KEEPER_KEYS[config.keeper_policy](columns, config.keeper_order))
    sizes = sizes.astype(np.int32)
    keeper_ids = ids[keeper_of].tolist()
    return {
        "item_id": ids.tolist(),
        "cluster_id": keeper_ids,
        "is_keeper": keeper_of == np.arange(n),
        "keeper_id": keeper_ids,
        "cluster_size": sizes,
        "min_link_similarity": np.where(sizes > 1, min_link, np.float32(np.nan)).astype(np.float32),
        "min_member_similarity": np.where(sizes > 1, min_member, np.float32(np.nan)).astype(np.float32),
        "is_chained": chained,
    }


def clusters_table(clusters: dict, run_id: str) -> pa.Table:
    """The output of `cluster_items` as a CLUSTERS_SCHEMA table (NaN min links become nulls)."""
    n = len(clusters["item_id"])
    link = np.asarray(clusters["min_link_similarity"], np.float32)
    diameter = np.asarray(clusters.get("min_member_similarity", np.full(n, np.nan)), np.float32)
    chained = np.asarray(clusters.get("is_chained", np.zeros(n, np.bool_)), np.bool_)
    return pa.table(
        {
            "item_id": pa.array(clusters["item_id"], pa.string()),
            "cluster_id": pa.array(clusters["cluster_id"], pa.string()),
            "is_keeper": pa.array(np.asarray(clusters["is_keeper"], np.bool_)),
            "keeper_id": pa.array(clusters["keeper_id"], pa.string()),
            "cluster_size": pa.array(np.asarray(clusters["cluster_size"], np.int32)),
            "min_link_similarity": pa.array(link, pa.float32(), mask=np.isnan(link)),
            "run_id": pa.array([run_id] * n, pa.string()),
            "min_member_similarity": pa.array(diameter, pa.float32(), mask=np.isnan(diameter)),
            "is_chained": pa.array(chained, pa.bool_()),
        },
        schema=CLUSTERS_SCHEMA,
    )


def summarize(clusters: dict) -> dict:
    """{"clusters_count": clusters of size >= 2, "items_to_drop": members that are not keepers,
    "items": all items, "largest_cluster": size, "chained_clusters": clusters flagged is_chained}."""
    sizes = np.asarray(clusters["cluster_size"])
    keep = np.asarray(clusters["is_keeper"], np.bool_)
    chained = np.asarray(clusters.get("is_chained", np.zeros(len(sizes), np.bool_)), np.bool_)
    return {
        "items": int(len(sizes)),
        "clusters_count": int(((sizes > 1) & keep).sum()),
        "items_to_drop": int((~keep).sum()),
        "largest_cluster": int(sizes.max()) if len(sizes) else 0,
        "chained_clusters": int((chained & keep).sum()),
    }
