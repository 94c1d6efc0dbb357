"""Metric-learning losses in TensorFlow, from small interchangeable parts (like pytorch-metric-learning):

  distances  embeddings (B, D) -> distance matrix (B, B):        "cosine" (1 - cos), "squared_euclidean"
  miners     distance matrix + labels -> which pairs/triplets count (MINERS): "all" (Pairs: every pair),
             "semihard", "hard" (Triplets: one mined triplet per positive pair / per anchor)
  losses     triplet (margin ranking) and contrastive (BATCH_LOSSES), explicit (anchor, positive, negative)
             or in-batch of any miner's output: make_batch_loss(kind, mining=..., distance=...).

Everything takes float embeddings (B, D) and integer labels (B,); two rows with the same label are a
positive pair, different labels a negative pair, and a row is never its own positive. Losses are scalars.

Definitions (d = distance, m = margin, [x]+ = max(x, 0)):
  triplet:      [d(a, p) - d(a, n) + m]+
  "all":        mean of the triplet loss over the valid triplets (a != p, same label; n of another label)
                whose loss is > 0 ("batch-all, positive triplets only"; 0 if there are none). This keeps
                the gradient from fading as most triplets become easy.
  "semihard":   FaceNet / tfa.losses.TripletSemiHardLoss: for each positive pair (a, p), the negative is the
                closest one that is still farther than p (d(a, n) > d(a, p)); if none is, the farthest
                negative. Mean over positive pairs whose anchor has at least one negative.
  "hard":       batch-hard (Hermans et al. 2017): per anchor, farthest positive and closest negative;
                mean over anchors that have both.
  contrastive:  positives [d - pos_margin]+, negatives [neg_margin - d]+; in-batch it is the mean over
                positive pairs plus the mean over negative pairs (each 0 if there are none), so the many
                negatives do not drown the few positives. With "all" these are every pair of the batch;
                with "semihard" / "hard" the (a, p) and (a, n) pairs of the mined triplets.
  normalized softmax (proxies): one learnt unit vector per class; cross-entropy of the cosines to all
                proxies divided by a temperature T (Zhai & Wu 2018, pytorch-metric-learning's
                NormalizedSoftmaxLoss). Used beside the triplet loss, never instead of it: every image is
                compared with every class at every step, not only with the few in its batch.
  info_nce:     (SimCLR's NT-Xent; SupCon when a row has several positives) every other row of the batch is
                a candidate: -log( sum_pos exp(cos/T) / sum_{b != a} exp(cos/T) ), averaged over its
                positives' share and over anchors that have a positive. Uses all B-2 negatives of every
                anchor at once: what copy detection (SSCD) trains with.
  koleo:        (Sablayrolles et al. 2019, used by SSCD) -mean_a log(min_b ||e_a - e_b||) over rows b of
                another label: a uniformity term that pushes each embedding away from its nearest other
                image, spreading the catalogue over the sphere so distinct images do not crowd together.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf

DISTANCES = ("cosine", "squared_euclidean")
_EPS = 1e-12


# --- distances --------------------------------------------------------------------------------------------

def cosine_distance_matrix(embeddings: tf.Tensor) -> tf.Tensor:
    """1 - cosine similarity between all rows, (B, D) -> (B, B) in [0, 2]. Rows are L2-normalised first."""
    e = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1, epsilon=_EPS)
    return 1.0 - tf.matmul(e, e, transpose_b=True)


def squared_euclidean_distance_matrix(embeddings: tf.Tensor) -> tf.Tensor:
    """||a - b||^2 between all rows, (B, D) -> (B, B), >= 0, exact zeros on the diagonal."""
    e = tf.cast(embeddings, tf.float32)
    sq = tf.reduce_sum(tf.square(e), axis=-1)
    d = sq[:, None] - 2.0 * tf.matmul(e, e, transpose_b=True) + sq[None, :]
    d = tf.maximum(d, 0.0)  # rounding can make it slightly negative
    return d * (1.0 - tf.eye(tf.shape(e)[0], dtype=d.dtype))


def pairwise_distance(a: tf.Tensor, b: tf.Tensor, distance: str = "cosine") -> tf.Tensor:
    """Distance between matching rows of a and b, (N, D) x (N, D) -> (N,)."""
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    if distance == "cosine":
        a = tf.math.l2_normalize(a, axis=-1, epsilon=_EPS)
        b = tf.math.l2_normalize(b, axis=-1, epsilon=_EPS)
        return 1.0 - tf.reduce_sum(a * b, axis=-1)
    if distance == "squared_euclidean":
        return tf.reduce_sum(tf.square(a - b), axis=-1)
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def distance_matrix(embeddings: tf.Tensor, distance: str = "cosine") -> tf.Tensor:
    """All-pairs distance matrix (B, B) of the named distance."""
    if distance == "cosine":
        return cosine_distance_matrix(embeddings)
    if distance == "squared_euclidean":
        return squared_euclidean_distance_matrix(embeddings)
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


# --- masks (who is whose positive / negative) ------------------------------------------------------------

def pair_masks(labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(positive, negative) boolean masks (B, B): same label and not the same row / different label."""
    labels = tf.reshape(labels, [-1])
    same = tf.equal(labels[:, None], labels[None, :])
    not_self = tf.logical_not(tf.eye(tf.shape(labels)[0], dtype=tf.bool))
    return tf.logical_and(same, not_self), tf.logical_not(same)


def _safe_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    mask = tf.cast(mask, values.dtype)
    return tf.reduce_sum(values * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)


# --- miners: distance matrix (B, B) + labels (B,) -> the pairs or triplets a loss counts -----------------

@dataclasses.dataclass(frozen=True)
class Pairs:
    """Every pair of a batch (what the "all" miner keeps): the distance matrix dist (B, B) with the masks
    of its positive pairs and of its negative pairs, bool (B, B) (pair_masks)."""
    dist: tf.Tensor
    positive: tf.Tensor
    negative: tf.Tensor


@dataclasses.dataclass(frozen=True)
class Triplets:
    """Mined triplets (a, p, n): d(a, p) `ap`, d(a, n) `an` and which triplets count, `valid` (bool), all
    three of one shape (one triplet per element)."""
    ap: tf.Tensor
    an: tf.Tensor
    valid: tf.Tensor


def all_pairs(dist: tf.Tensor, labels: tf.Tensor) -> Pairs:
    """The "all" miner: keeps every positive and every negative pair (a triplet loss forms every triplet
    of them, batch-all)."""
    pos, neg = pair_masks(labels)
    return Pairs(dist, pos, neg)


def _positive_pair_rows(pairs: Pairs):
    """For every positive pair (a, p): d(a, p) (N,), the anchor's row of distances (N, B) and which of
    them are negatives (N, B). Working on these rows instead of a (B, B, B) cube of triplets costs
    N*B = B*(K-1)*B instead of B^3 (about 10x less for 10 x 16 batches) and keeps larger batches affordable."""
    index = tf.where(pairs.positive)                    # (N, 2) [anchor, positive]
    d_ap = tf.gather_nd(pairs.dist, index)
    return d_ap, tf.gather(pairs.dist, index[:, 0]), tf.gather(pairs.negative, index[:, 0])


def semihard_triplets(dist: tf.Tensor, labels: tf.Tensor) -> Triplets:
    """FaceNet semi-hard mining (same choice as tfa.losses.TripletSemiHardLoss): one triplet (N,) per
    positive pair, valid where its anchor has a negative."""
    d_ap, d_an, is_neg = _positive_pair_rows(all_pairs(dist, labels))
    outside = tf.logical_and(is_neg, d_an > d_ap[:, None])     # negatives farther than p
    big = tf.reduce_max(dist) + 1.0
    closest_outside = tf.reduce_min(tf.where(outside, d_an, big), axis=1)
    farthest_negative = tf.reduce_max(tf.where(is_neg, d_an, -big), axis=1)
    chosen = tf.where(tf.reduce_any(outside, axis=1), closest_outside, farthest_negative)
    return Triplets(d_ap, chosen, tf.reduce_any(is_neg, axis=1))


def hardest_triplets(dist: tf.Tensor, labels: tf.Tensor) -> Triplets:
    """Batch-hard mining (Hermans et al. 2017): one triplet (B,) per anchor, its farthest positive and its
    closest negative, valid where the anchor has both."""
    pos, neg = pair_masks(labels)
    big = tf.reduce_max(dist) + 1.0
    hardest_pos = tf.reduce_max(tf.where(pos, dist, -big), axis=1)
    hardest_neg = tf.reduce_min(tf.where(neg, dist, big), axis=1)
    valid = tf.logical_and(tf.reduce_any(pos, axis=1), tf.reduce_any(neg, axis=1))
    return Triplets(hardest_pos, hardest_neg, valid)


# The --mining values: name -> miner (dist (B, B), labels (B,)) -> Pairs | Triplets.
MINERS: dict[str, Callable[[tf.Tensor, tf.Tensor], Pairs | Triplets]] = {
    "all": all_pairs,
    "semihard": semihard_triplets,
    "hard": hardest_triplets,
}


# --- losses of what a miner kept --------------------------------------------------------------------------

def mined_triplet_loss(mined: Pairs | Triplets, margin: float) -> tf.Tensor:
    """Mean of [d(a, p) - d(a, n) + m]+. Of Pairs: over every triplet they form (a positive and a negative
    pair of one anchor) whose loss is > 0 (batch-all, positive triplets only); of Triplets: over the valid
    ones. Scalar, 0 if none counts."""
    if isinstance(mined, Pairs):
        d_ap, d_an, is_neg = _positive_pair_rows(mined)
        loss = tf.nn.relu(d_ap[:, None] - d_an + margin)     # (N, B): one row per positive pair
        return _safe_mean(loss, tf.logical_and(is_neg, loss > 1e-16))
    return _safe_mean(tf.nn.relu(mined.ap - mined.an + margin), mined.valid)


def mined_contrastive_loss(mined: Pairs | Triplets, pos_margin: float = 0.0, neg_margin: float = 0.5) -> tf.Tensor:
    """Mean of [d - pos_margin]+ over the positive pairs plus mean of [neg_margin - d]+ over the negative
    pairs (each 0 if there are none), so the many negatives do not drown the few positives. Of Triplets the
    pairs are the valid triplets' (a, p) and (a, n). Scalar."""
    if isinstance(mined, Pairs):
        d_pos, pos, d_neg, neg = mined.dist, mined.positive, mined.dist, mined.negative
    else:
        d_pos, pos, d_neg, neg = mined.ap, mined.valid, mined.an, mined.valid
    return _safe_mean(tf.nn.relu(d_pos - pos_margin), pos) + _safe_mean(tf.nn.relu(neg_margin - d_neg), neg)


# The --loss values: the in-batch losses make_batch_loss assembles, each of any miner's output.
BATCH_LOSSES = ("triplet", "contrastive")


def triplet_loss(anchor: tf.Tensor, positive: tf.Tensor, negative: tf.Tensor, *, margin: float = 0.4,
                 distance: str = "cosine") -> tf.Tensor:
    """Mean of [d(a, p) - d(a, n) + m]+ over explicit triplets (rows of three (N, D) tensors)."""
    d_ap = pairwise_distance(anchor, positive, distance)
    d_an = pairwise_distance(anchor, negative, distance)
    return tf.reduce_mean(tf.nn.relu(d_ap - d_an + margin))


def contrastive_loss(a: tf.Tensor, b: tf.Tensor, same: tf.Tensor, *, pos_margin: float = 0.0,
                     neg_margin: float = 0.5, distance: str = "cosine") -> tf.Tensor:
    """Mean over explicit pairs (rows of a, b (N, D); same (N,) bool): [d - pos_margin]+ if same else
    [neg_margin - d]+."""
    d = pairwise_distance(a, b, distance)
    same = tf.cast(tf.reshape(same, [-1]), tf.bool)
    return tf.reduce_mean(tf.where(same, tf.nn.relu(d - pos_margin), tf.nn.relu(neg_margin - d)))


def normalized_softmax_loss(embeddings: tf.Tensor, class_index: tf.Tensor, proxies: tf.Tensor,
                            temperature: float = 0.05) -> tf.Tensor:
    """Mean cross-entropy of softmax(cos(embedding, proxy_c) / temperature) against each row's class.

    embeddings (B, D) and proxies (C, D) are L2-normalised here; class_index (B,) holds row numbers of
    `proxies` (0..C-1). Scalar.
    """
    e = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1, epsilon=_EPS)
    w = tf.math.l2_normalize(tf.cast(proxies, tf.float32), axis=-1, epsilon=_EPS)
    logits = tf.matmul(e, w, transpose_b=True) / temperature
    labels = tf.cast(tf.reshape(class_index, [-1]), tf.int32)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def info_nce_loss(labels: tf.Tensor, embeddings: tf.Tensor, temperature: float = 0.05) -> tf.Tensor:
    """InfoNCE over the batch: embeddings (B, D) (L2-normalised here), labels (B,) (same label =
    positive). Scalar; 0 if no row has a positive."""
    e = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1, epsilon=_EPS)
    logits = tf.matmul(e, e, transpose_b=True) / temperature
    pos, _ = pair_masks(labels)
    not_self = 1.0 - tf.eye(tf.shape(e)[0])
    # log-softmax over every other row (the row itself excluded from the denominator).
    logits = logits - tf.stop_gradient(tf.reduce_max(logits, axis=1, keepdims=True))
    log_denominator = tf.math.log(tf.reduce_sum(tf.exp(logits) * not_self, axis=1, keepdims=True) + _EPS)
    log_prob = logits - log_denominator
    pos = tf.cast(pos, tf.float32)
    n_pos = tf.reduce_sum(pos, axis=1)
    per_anchor = -tf.reduce_sum(log_prob * pos, axis=1) / tf.maximum(n_pos, 1.0)
    has_pos = tf.cast(n_pos > 0, tf.float32)
    return tf.reduce_sum(per_anchor * has_pos) / tf.maximum(tf.reduce_sum(has_pos), 1.0)


def koleo_loss(embeddings: tf.Tensor, labels: tf.Tensor | None = None) -> tf.Tensor:
    """KoLeo uniformity term: -mean over rows of log(distance to the nearest row of ANOTHER label), rows
    L2-normalised (with labels None: the nearest other row). Positives are left out, as in SSCD: pushing a
    copy away from its own original would undo the loss that pulls them together. embeddings (B, D). Scalar."""
    e = tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1, epsilon=_EPS)
    n = tf.shape(e)[0]
    if labels is None:
        excluded = tf.eye(n)
    else:
        labels = tf.reshape(labels, [-1])
        excluded = tf.cast(tf.equal(labels[:, None], labels[None, :]), tf.float32)  # self and positives
    cos = tf.matmul(e, e, transpose_b=True) - 3.0 * excluded  # excluded rows are never the nearest
    nearest = tf.reduce_max(cos, axis=1)
    return -tf.reduce_mean(tf.math.log(tf.sqrt(tf.maximum(2.0 - 2.0 * nearest, 0.0)) + 1e-8))


# --- the loss the trainer uses ----------------------------------------------------------------------------

def make_batch_loss(kind: str = "triplet", *, mining: str = "all", distance: str = "cosine",
                    margin: float = 0.4, pos_margin: float = 0.0) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A function (labels (B,), embeddings (B, D)) -> scalar loss: the `distance` matrix, mined by
    MINERS[`mining`], scored by the `kind` loss (BATCH_LOSSES).

    kind "triplet" uses `margin`; kind "contrastive" uses `pos_margin` and `margin` as the negative margin.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if mining not in MINERS:
        raise ValueError(f"mining must be one of {tuple(MINERS)}, got {mining!r}")
    if kind not in BATCH_LOSSES:
        raise ValueError(f"kind must be one of {BATCH_LOSSES}, got {kind!r}")
    miner = MINERS[mining]

    def loss_fn(labels, embeddings):
        mined = miner(distance_matrix(embeddings, distance), labels)
        if kind == "triplet":
            return mined_triplet_loss(mined, margin)
        return mined_contrastive_loss(mined, pos_margin, margin)
    loss_fn.__name__ = f"{kind}_{mining}_{distance}"
    return loss_fn


# The --instance_loss values: the copy (instance) loss of a batch whose rows share a label with their
# edited copies only.
INSTANCE_LOSSES = ("triplet", "info_nce")


def make_instance_loss(kind: str = "triplet", *, distance: str = "cosine", margin: float = 0.15,
                       temperature: float = 0.05) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
    """A function (instance ids (B,), embeddings (B, D)) -> scalar loss: "triplet" is the batch-all triplet
    loss on `distance` with `margin`; "info_nce" is info_nce_loss at `temperature` (every other image of
    the batch a negative)."""
    if kind not in INSTANCE_LOSSES:
        raise ValueError(f"instance_loss must be one of {INSTANCE_LOSSES}, got {kind!r}")
    if kind == "info_nce":
        def instance_loss(ids, embeddings):
            return info_nce_loss(ids, embeddings, temperature)
        return instance_loss
    return make_batch_loss("triplet", mining="all", distance=distance, margin=margin)
