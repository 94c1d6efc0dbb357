"""Metric-learning losses in TensorFlow, from small interchangeable parts (like pytorch-metric-learning):

  distances  embeddings (B, D) -> distance matrix (B, B):        "cosine" (1 - cos), "squared_euclidean"
  miners     distance matrix + labels -> which pairs/triplets count: "all", "semihard", "hard"
  losses     triplet (margin ranking) and contrastive, explicit (anchor, positive, negative) or in-batch.

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
                negatives do not drown the few positives.
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

from typing import Callable

import tensorflow as tf

DISTANCES = ("cosine", "squared_euclidean")
MINERS = ("all", "semihard", "hard")
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


# --- miners -> triplet losses -----------------------------------------------------------------------------

def _safe_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    mask = tf.cast(mask, values.dtype)
    return tf.reduce_sum(values * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)


def _positive_pair_rows(dist: tf.Tensor, labels: tf.Tensor):
    """For every positive pair (a, p): d(a, p) (N,), the anchor's row of distances (N, B) and which of
    them are negatives (N, B). Working on these rows instead of a (B, B, B) cube of triplets costs
    N*B = B*(K-1)*B instead of B^3 (about 10x less for 10 x 16 batches) and keeps larger batches affordable."""
    pos, neg = pair_masks(labels)
    pairs = tf.where(pos)                               # (N, 2) [anchor, positive]
    d_ap = tf.gather_nd(dist, pairs)
    return d_ap, tf.gather(dist, pairs[:, 0]), tf.gather(neg, pairs[:, 0])


def batch_all_triplet_loss(dist: tf.Tensor, labels: tf.Tensor, margin: float) -> tf.Tensor:
    """Mean of [d_ap - d_an + m]+ over valid triplets with a positive loss (0 if none)."""
    d_ap, d_an, is_neg = _positive_pair_rows(dist, labels)
    loss = tf.nn.relu(d_ap[:, None] - d_an + margin)     # (N, B): one row per positive pair
    return _safe_mean(loss, tf.logical_and(is_neg, loss > 1e-16))


def semihard_triplet_loss(dist: tf.Tensor, labels: tf.Tensor, margin: float) -> tf.Tensor:
    """FaceNet semi-hard mining (same choice as tfa.losses.TripletSemiHardLoss), mean over positive pairs."""
    d_ap, d_an, is_neg = _positive_pair_rows(dist, labels)
    outside = tf.logical_and(is_neg, d_an > d_ap[:, None])     # negatives farther than p
    big = tf.reduce_max(dist) + 1.0
    closest_outside = tf.reduce_min(tf.where(outside, d_an, big), axis=1)
    farthest_negative = tf.reduce_max(tf.where(is_neg, d_an, -big), axis=1)
    chosen = tf.where(tf.reduce_any(outside, axis=1), closest_outside, farthest_negative)
    loss = tf.nn.relu(d_ap - chosen + margin)
    return _safe_mean(loss, tf.reduce_any(is_neg, axis=1))


def batch_hard_triplet_loss(dist: tf.Tensor, labels: tf.Tensor, margin: float) -> tf.Tensor:
    """Per anchor: farthest positive, closest negative; mean of [d_ap - d_an + m]+ over anchors with both."""
    pos, neg = pair_masks(labels)
    big = tf.reduce_max(dist) + 1.0
    hardest_pos = tf.reduce_max(tf.where(pos, dist, -big), axis=1)
    hardest_neg = tf.reduce_min(tf.where(neg, dist, big), axis=1)
    valid = tf.logical_and(tf.reduce_any(pos, axis=1), tf.reduce_any(neg, axis=1))
    return _safe_mean(tf.nn.relu(hardest_pos - hardest_neg + margin), valid)


_TRIPLET_MINERS: dict[str, Callable] = {
    "all": batch_all_triplet_loss,
    "semihard": semihard_triplet_loss,
    "hard": batch_hard_triplet_loss,
}


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


def batch_contrastive_loss(dist: tf.Tensor, labels: tf.Tensor, pos_margin: float = 0.0,
                           neg_margin: float = 0.5) -> tf.Tensor:
    """In-batch contrastive loss: mean over positive pairs + mean over negative pairs (a != b)."""
    pos, neg = pair_masks(labels)
    return (_safe_mean(tf.nn.relu(dist - pos_margin), pos)
            + _safe_mean(tf.nn.relu(neg_margin - dist), neg))


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
    """A function (labels (B,), embeddings (B, D)) -> scalar loss, assembled from the parts above.

    kind "triplet" uses `mining` ("all" | "semihard" | "hard") and `margin`; kind "contrastive" uses
    `pos_margin` and `margin` as the negative margin (mining does not apply).
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if kind == "triplet":
        if mining not in _TRIPLET_MINERS:
            raise ValueError(f"mining must be one of {MINERS}, got {mining!r}")
        miner = _TRIPLET_MINERS[mining]

        def loss_fn(labels, embeddings):
            return miner(distance_matrix(embeddings, distance), labels, margin)
    elif kind == "contrastive":
        def loss_fn(labels, embeddings):
            return batch_contrastive_loss(distance_matrix(embeddings, distance), labels, pos_margin, margin)
    else:
        raise ValueError(f"kind must be 'triplet' or 'contrastive', got {kind!r}")
    loss_fn.__name__ = f"{kind}_{mining if kind == 'triplet' else 'pairs'}_{distance}"
    return loss_fn
