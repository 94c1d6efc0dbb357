"""Which images go together: class-balanced P x K batches, and explicit triplets / pairs.

All functions return integer index arrays into the caller's image array; they never copy images. Labels
are integer class ids (n,). Randomness comes only from the numpy Generator passed in, so a seed fixes it.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


class PKSampler:
    """Class-balanced batches: P classes x K images each (batch size P*K), for in-batch mining.

    Each class's images are visited in a shuffled order, K at a time, reshuffled when used up, so within an
    epoch every image is seen about once no matter how unbalanced the classes. A class with fewer than K
    images contributes all it has plus repeats (drawn with replacement), so every batch still holds exactly
    K per class and every anchor has a positive.

    Args:
      labels: int (n,) class ids.
      p: classes per batch (<= number of classes).
      k: images per class per batch (>= 2, so each image has a positive).
      batches_per_epoch: default n // (p*k).
    """

    def __init__(self, labels: np.ndarray, p: int, k: int, batches_per_epoch: int | None = None):
        self.labels = np.asarray(labels).reshape(-1)
        self.classes, inverse = np.unique(self.labels, return_inverse=True)
        if k < 2:
            raise ValueError(f"k must be >= 2 so that every anchor has a positive, got {k}")
        if not 1 <= p <= len(self.classes):
            raise ValueError(f"p must be between 1 and the number of classes ({len(self.classes)}), got {p}")
        self.p, self.k = int(p), int(k)
        self.members = [np.flatnonzero(inverse == c) for c in range(len(self.classes))]
        self.batches_per_epoch = int(batches_per_epoch or max(1, len(self.labels) // (p * k)))

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Yield `batches_per_epoch` index arrays of shape (p*k,), grouped class by class."""
        orders = [rng.permutation(m) for m in self.members]
        cursors = [0] * len(self.members)
        # Classes in proportion to their size, so big classes are not starved when p < #classes.
        weights = np.array([len(m) for m in self.members], dtype=np.float64)
        weights /= weights.sum()
        for _ in range(self.batches_per_epoch):
            chosen = (np.arange(len(self.members)) if self.p == len(self.members)
                      else rng.choice(len(self.members), size=self.p, replace=False, p=weights))
            batch = []
            for c in chosen:
                members = self.members[c]
                if len(members) < self.k:
                    batch.append(np.concatenate([members, rng.choice(members, self.k - len(members))]))
                    continue
                if cursors[c] + self.k > len(orders[c]):
                    orders[c] = rng.permutation(members)
                    cursors[c] = 0
                batch.append(orders[c][cursors[c]:cursors[c] + self.k])
                cursors[c] += self.k
            yield np.concatenate(batch)


def _sample_other(pool_by_label: dict, labels: np.ndarray, anchors: np.ndarray, rng, same: bool,
                  exclude_self: bool) -> np.ndarray:
    """For each anchor, a random index whose label is (same=True) or is not (same=False) the anchor's."""
    n = len(labels)
    out = np.empty(len(anchors), dtype=np.int64)
    if same:
        for lab in np.unique(labels[anchors]):
            rows = np.flatnonzero(labels[anchors] == lab)
            pool = pool_by_label[lab]
            # Draw from the pool minus the anchor itself: pick among len(pool)-1 and skip the anchor's slot.
            pos_in_pool = np.searchsorted(pool, anchors[rows])
            if exclude_self:
                pick = rng.integers(0, len(pool) - 1, len(rows))
                pick = pick + (pick >= pos_in_pool)
            else:
                pick = rng.integers(0, len(pool), len(rows))
            out[rows] = pool[pick]
        return out
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    for lab in np.unique(labels[anchors]):
        rows = np.flatnonzero(labels[anchors] == lab)
        lo, hi = np.searchsorted(sorted_labels, lab, "left"), np.searchsorted(sorted_labels, lab, "right")
        # Uniform over the n - (hi - lo) indices outside the label's block of the sorted order.
        pick = rng.integers(0, n - (hi - lo), len(rows))
        pick = pick + (pick >= lo) * (hi - lo)
        out[rows] = order[pick]
    return out


def class_triplets(labels: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """n random (anchor, positive, negative) index triplets: positive shares the anchor's class (and is a
    different image), negative has another class. Anchors come only from classes with >= 2 images.

    Returns three int64 arrays (n,).
    """
    labels = np.asarray(labels).reshape(-1)
    pools = {lab: np.flatnonzero(labels == lab) for lab in np.unique(labels)}
    eligible = np.concatenate([p for p in pools.values() if len(p) >= 2] or [np.empty(0, np.int64)])
    if len(eligible) == 0 or len(pools) < 2:
        raise ValueError("class triplets need at least two classes and a class with two images")
    anchors = rng.choice(eligible, n)
    positives = _sample_other(pools, labels, anchors, rng, same=True, exclude_self=True)
    negatives = _sample_other(pools, labels, anchors, rng, same=False, exclude_self=True)
    return anchors, positives, negatives


def instance_triplets(labels: np.ndarray, n: int, rng: np.random.Generator, *,
                      same_class_negatives: bool = False) -> tuple[np.ndarray, ...]:
    """n (anchor, positive, negative) triplets for near-duplicate training: the positive is the anchor's own
    image (the caller augments anchor and positive independently), the negative is a different image --
    of another class, or with same_class_negatives=True of the anchor's class (the hard case for
    deduplication: similar items that are not copies).

    Returns three int64 arrays (n,); positive == anchor, negative != anchor always.
    """
    labels = np.asarray(labels).reshape(-1)
    pools = {lab: np.flatnonzero(labels == lab) for lab in np.unique(labels)}
    if same_class_negatives:
        eligible = np.concatenate([p for p in pools.values() if len(p) >= 2] or [np.empty(0, np.int64)])
        if len(eligible) == 0:
            raise ValueError("same-class negatives need a class with two images")
        anchors = rng.choice(eligible, n)
        negatives = _sample_other(pools, labels, anchors, rng, same=True, exclude_self=True)
    else:
        if len(pools) < 2:
            raise ValueError("instance triplets with other-class negatives need at least two classes")
        anchors = rng.integers(0, len(labels), n)
        negatives = _sample_other(pools, labels, anchors, rng, same=False, exclude_self=True)
    return anchors, anchors.copy(), negatives


def class_pairs(labels: np.ndarray, n: int, rng: np.random.Generator,
                positive_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n (left, right, same) pairs for a contrastive loss: about `positive_fraction` same-class pairs.

    Returns left, right int64 (n,) and same bool (n,) (labels[left] == labels[right] exactly when same).
    """
    anchors, positives, negatives = class_triplets(labels, n, rng)
    same = rng.random(n) < positive_fraction
    return anchors, np.where(same, positives, negatives), same


def same_class_partners(labels: np.ndarray, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each anchor index, a uniformly random OTHER index of the same class (int64, like anchors).
    Raises ValueError if an anchor's class has a single member."""
    labels = np.asarray(labels).reshape(-1)
    anchors = np.asarray(anchors, dtype=np.int64).reshape(-1)
    pools = {lab: np.flatnonzero(labels == lab) for lab in np.unique(labels[anchors])}
    lonely = [lab for lab, pool in pools.items() if len(pool) < 2]
    if lonely:
        raise ValueError(f"classes {lonely} have a single image: no same-class partner exists")
    return _sample_other(pools, labels, anchors, rng, same=True, exclude_self=True)


def other_class_partners(labels: np.ndarray, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each anchor index, a uniformly random index of a different class (int64, like anchors)."""
    labels = np.asarray(labels).reshape(-1)
    anchors = np.asarray(anchors, dtype=np.int64).reshape(-1)
    if len(np.unique(labels)) < 2:
        raise ValueError("other-class partners need at least two classes")
    return _sample_other({}, labels, anchors, rng, same=False, exclude_self=True)


def pair_triplets(pair_ids: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """n (anchor, positive, negative) triplets from a pairs layout: `pair_ids` (n_images,) gives each image
    its pair; the positive is the anchor's partner in its pair, the negative an image of ANOTHER pair.
    (The same as class_triplets with the pair as the class: a pair is a class of two.)"""
    return class_triplets(pair_ids, n, rng)


class InstanceSampler:
    """Batches of `batch_size` distinct images drawn without replacement (instance mode: no labels, every
    image is its own identity; the trainer adds an augmented view of each, which is its only positive).

    Args:
      n: number of images; batch_size: images per batch (<= n); batches_per_epoch: default n // batch_size.
    """

    def __init__(self, n: int, batch_size: int, batches_per_epoch: int | None = None):
        if not 2 <= batch_size <= n:
            raise ValueError(f"batch_size must be between 2 and the number of images ({n}), got {batch_size}")
        self.n, self.batch_size = int(n), int(batch_size)
        self.batches_per_epoch = int(batches_per_epoch or max(1, n // batch_size))

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        order, cursor = rng.permutation(self.n), 0
        for _ in range(self.batches_per_epoch):
            if cursor + self.batch_size > self.n:
                order, cursor = rng.permutation(self.n), 0
            yield order[cursor:cursor + self.batch_size]
            cursor += self.batch_size


class PairedInstanceSampler(InstanceSampler):
    """InstanceSampler batches that also carry whole hard-negative pairs (trainer.hard_negatives): each
    batch holds `pairs_per_batch` pairs (both images of each; about `share` of the batch's images, at least
    one pair), the pairs cycling in a shuffled order, and is filled up with other images from a running
    shuffled order, as InstanceSampler draws them. Every image is in a batch at most once, so the in-batch
    loss takes the two images of a pair as two identities and pushes them apart.

    Args:
      n, batch_size, batches_per_epoch: as InstanceSampler.
      pairs: int (p, 2) indices (< n) of the pairs' images; the two of a pair differ.
      share: the part of a batch's images given to pairs (0.25: a quarter).
    """

    def __init__(self, n: int, batch_size: int, pairs: np.ndarray, batches_per_epoch: int | None = None,
                 share: float = 0.25):
        super().__init__(n, batch_size, batches_per_epoch)
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        if len(pairs) == 0:
            raise ValueError("a paired sampler needs at least one pair")
        if pairs.min() < 0 or pairs.max() >= n or np.any(pairs[:, 0] == pairs[:, 1]):
            raise ValueError(f"pairs must join two different images among the {n}")
        self.pairs = pairs
        self.pairs_per_batch = min(len(pairs), max(1, int(batch_size * share) // 2))

    def epoch(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Yield `batches_per_epoch` index arrays (batch_size,) of distinct images: the pairs' images first
        (pair by pair), then the filling."""
        m = self.pairs_per_batch
        pair_order, pair_cursor = rng.permutation(len(self.pairs)), 0
        order, cursor = rng.permutation(self.n), 0
        for _ in range(self.batches_per_epoch):
            if pair_cursor + m > len(self.pairs):
                pair_order, pair_cursor = rng.permutation(len(self.pairs)), 0
            chosen = self.pairs[pair_order[pair_cursor:pair_cursor + m]].reshape(-1)
            pair_cursor += m
            # An image in two of the chosen pairs is taken once (one identity per image per batch).
            _, first = np.unique(chosen, return_index=True)
            fixed = chosen[np.sort(first)]
            need = self.batch_size - len(fixed)
            # A window of `need + len(fixed)` distinct images holds at least `need` outside `fixed`.
            if cursor + self.batch_size > self.n:
                order, cursor = rng.permutation(self.n), 0
            window = order[cursor:cursor + self.batch_size]
            take = np.flatnonzero(~np.isin(window, fixed))[:need]
            cursor += int(take[-1]) + 1 if need else 0
            yield np.concatenate([fixed, window[take]])
