"""Losses against hand-computed values and a plain-loop NumPy reference."""
import itertools

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from trainer import losses as L

# Four unit vectors in 2-D, two classes. Cosine distances (1 - cos):
#   d01 = 0.4, d02 = 0.2, d03 = 2.0, d12 = 0.04, d13 = 1.6, d23 = 1.8
EMB = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [-1.0, 0.0]], np.float32)
LAB = np.array([0, 0, 1, 1])


def _np_dist(e, distance):
    if distance == "cosine":
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        return 1.0 - e @ e.T
    return ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1)


def _np_loss(e, y, mining, margin, distance="cosine"):
    """Loop reference of the three triplet miners (see trainer.losses docstring)."""
    d = _np_dist(e.astype(np.float64), distance)
    n = len(y)
    pos = [(a, p) for a, p in itertools.product(range(n), range(n)) if a != p and y[a] == y[p]]
    negs = {a: [k for k in range(n) if y[k] != y[a]] for a in range(n)}
    if mining == "all":
        vals = [max(d[a, p] - d[a, k] + margin, 0) for a, p in pos for k in negs[a]]
        vals = [v for v in vals if v > 1e-16]
        return float(np.mean(vals)) if vals else 0.0
    if mining == "semihard":
        vals = []
        for a, p in pos:
            if not negs[a]:
                continue
            farther = [d[a, k] for k in negs[a] if d[a, k] > d[a, p]]
            dn = min(farther) if farther else max(d[a, k] for k in negs[a])
            vals.append(max(d[a, p] - dn + margin, 0))
        return float(np.mean(vals)) if vals else 0.0
    if mining == "hard":
        vals = []
        for a in range(n):
            ps = [p for b, p in pos if b == a]
            if ps and negs[a]:
                vals.append(max(max(d[a, p] for p in ps) - min(d[a, k] for k in negs[a]) + margin, 0))
        return float(np.mean(vals)) if vals else 0.0
    raise ValueError(mining)


def _tf_loss(e, y, mining, margin, distance="cosine"):
    return float(L.make_batch_loss("triplet", mining=mining, distance=distance, margin=margin)(
        tf.constant(y), tf.constant(e)))


def test_distance_matrices():
    d = L.cosine_distance_matrix(tf.constant(EMB)).numpy()
    np.testing.assert_allclose(d[np.triu_indices(4, 1)], [0.4, 0.2, 2.0, 0.04, 1.6, 1.8], atol=1e-6)
    sq = L.squared_euclidean_distance_matrix(tf.constant(EMB)).numpy()
    np.testing.assert_allclose(sq, 2 * d, atol=1e-6)  # unit vectors: ||a-b||^2 = 2 (1 - cos)
    assert np.all(np.diag(sq) == 0)
    with pytest.raises(ValueError):
        L.distance_matrix(tf.constant(EMB), "manhattan")


@pytest.mark.parametrize("mining,distance,margin,expected", [
    # batch-all: positive triplets 0.6, 0.76, 2.0, 2.16, 0.2, 0.6 -> 6.32 / 6
    ("all", "cosine", 0.4, 6.32 / 6),
    # semi-hard: pairs (0,1) -> n=3: 0; (1,0) -> n=3: 0; (2,3) -> none farther, farthest n=0: 2.0;
    # (3,2) -> n=0: 0.2.  (0 + 0 + 2.0 + 0.2) / 4
    ("semihard", "cosine", 0.4, 0.55),
    # batch-hard: anchors 0.6, 0.76, 2.16, 0.6 -> 4.12 / 4
    ("hard", "cosine", 0.4, 1.03),
    # squared Euclidean = 2 x cosine distance here: 0.9, 1.22, 3.7, 4.02, 0.1, 0.9 -> 10.84 / 6
    ("all", "squared_euclidean", 0.5, 10.84 / 6),
])
def test_hand_computed_values(mining, distance, margin, expected):
    assert _tf_loss(EMB, LAB, mining, margin, distance) == pytest.approx(expected, abs=1e-5)
    assert _np_loss(EMB, LAB, mining, margin, distance) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("mining", ["all", "semihard", "hard"])
@pytest.mark.parametrize("distance", ["cosine", "squared_euclidean"])
def test_matches_loop_reference_on_random_batches(mining, distance):
    rng = np.random.default_rng(3)
    for trial in range(3):
        e = rng.standard_normal((12, 5)).astype(np.float32)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        y = rng.integers(0, 4, 12)
        y[-1] = 9  # a class with a single member: an anchor without positives
        want = _np_loss(e, y, mining, 0.4, distance)
        assert want > 0
        assert _tf_loss(e, y, mining, 0.4, distance) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_degenerate_batches():
    # All one class: no negatives -> 0 (nothing to learn), not NaN.
    one = np.zeros(4, np.int64)
    for mining in ("all", "semihard", "hard"):
        assert _tf_loss(EMB, one, mining, 0.4) == 0.0
    # Collapsed embeddings: every triplet loss equals the margin exactly.
    same = np.tile(EMB[:1], (4, 1))
    for mining in ("all", "semihard", "hard"):
        assert _tf_loss(same, LAB, mining, 0.4) == pytest.approx(0.4, abs=1e-6)


def test_contrastive():
    # Batch: positives d = 0.4, 0.4, 1.8, 1.8 -> 1.1; negatives [0.5 - d]+ = 0.3, 0, 0.46, 0 -> 0.19.
    fn = L.make_batch_loss("contrastive", distance="cosine", margin=0.5)
    assert float(fn(tf.constant(LAB), tf.constant(EMB))) == pytest.approx(1.29, abs=1e-5)
    # Explicit pairs (0,1) same d=0.4; (0,2) different d=0.2 -> [0.5-0.2]+ = 0.3; mean 0.35.
    got = L.contrastive_loss(EMB[[0, 0]], EMB[[1, 2]], np.array([True, False]), neg_margin=0.5)
    assert float(got) == pytest.approx(0.35, abs=1e-6)


def test_explicit_triplets_and_gradient():
    # (a=0, p=1, n=2): 0.4 - 0.2 + 0.4 = 0.6; (a=3, p=2, n=1): 1.8 - 1.6 + 0.4 = 0.6 -> 0.6
    got = L.triplet_loss(EMB[[0, 3]], EMB[[1, 2]], EMB[[2, 1]], margin=0.4)
    assert float(got) == pytest.approx(0.6, abs=1e-6)
    e = tf.Variable(EMB)
    with tf.GradientTape() as tape:
        loss = L.make_batch_loss(mining="semihard")(tf.constant(LAB), e)
    grad = tape.gradient(loss, e).numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


def test_bad_names():
    with pytest.raises(ValueError, match="mining"):
        L.make_batch_loss(mining="easy")
    with pytest.raises(ValueError, match="distance"):
        L.make_batch_loss(distance="l1")
    with pytest.raises(ValueError, match="kind"):
        L.make_batch_loss("arcface")


@pytest.mark.parametrize("distance", ["cosine", "squared_euclidean"])
def test_contrastive_matches_loop_reference_on_random_batches(distance):
    rng = np.random.default_rng(11)
    e = rng.standard_normal((14, 5)).astype(np.float32)
    y = rng.integers(0, 4, 14)
    d = _np_dist(e.astype(np.float64), distance)
    pos = [d[a, b] for a in range(14) for b in range(14) if a != b and y[a] == y[b]]
    neg = [d[a, b] for a in range(14) for b in range(14) if y[a] != y[b]]
    want = np.mean([max(v - 0.1, 0) for v in pos]) + np.mean([max(0.7 - v, 0) for v in neg])
    fn = L.make_batch_loss("contrastive", distance=distance, margin=0.7, pos_margin=0.1)
    assert float(fn(tf.constant(y), tf.constant(e))) == pytest.approx(want, rel=1e-4, abs=1e-5)
    # Explicit pairs against the same reference.
    same = y[:7] == y[7:]
    dd = np.array([d[i, i + 7] for i in range(7)])
    want = np.mean(np.where(same, np.maximum(dd - 0.1, 0), np.maximum(0.7 - dd, 0)))
    got = L.contrastive_loss(e[:7], e[7:], same, pos_margin=0.1, neg_margin=0.7, distance=distance)
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-5)


def _np_mined_pairs(e, y, mining, distance):
    """Loop reference of the pairs a triplet miner hands a pair loss: (d(a, p), d(a, n)) of each mined
    triplet, as in _np_loss."""
    d = _np_dist(e.astype(np.float64), distance)
    n = len(y)
    negs = {a: [k for k in range(n) if y[k] != y[a]] for a in range(n)}
    if mining == "semihard":
        pos = [(a, p) for a, p in itertools.product(range(n), range(n)) if a != p and y[a] == y[p] and negs[a]]
        out = []
        for a, p in pos:
            farther = [d[a, k] for k in negs[a] if d[a, k] > d[a, p]]
            out.append((d[a, p], min(farther) if farther else max(d[a, k] for k in negs[a])))
        return out
    return [(max(d[a, p] for p in range(n) if p != a and y[p] == y[a]), min(d[a, k] for k in negs[a]))
            for a in range(n) if negs[a] and any(p != a and y[p] == y[a] for p in range(n))]


@pytest.mark.parametrize("mining", ["semihard", "hard"])
@pytest.mark.parametrize("distance", ["cosine", "squared_euclidean"])
def test_a_triplet_miner_feeds_the_contrastive_loss(mining, distance):
    """Miners and losses are separate parts: the contrastive loss of the mined triplets' (a, p) and (a, n)
    pairs; the triplet loss of the same miner's output is the mined triplet loss."""
    rng = np.random.default_rng(12)
    e = rng.standard_normal((14, 5)).astype(np.float32)
    y = rng.integers(0, 4, 14)
    y[-1] = 9  # an anchor without positives
    pairs = _np_mined_pairs(e, y, mining, distance)
    want = np.mean([max(ap - 0.1, 0) for ap, _ in pairs]) + np.mean([max(0.7 - an, 0) for _, an in pairs])
    fn = L.make_batch_loss("contrastive", mining=mining, distance=distance, margin=0.7, pos_margin=0.1)
    assert float(fn(tf.constant(y), tf.constant(e))) == pytest.approx(want, rel=1e-4, abs=1e-5)
    mined = L.MINERS[mining](L.distance_matrix(tf.constant(e), distance), tf.constant(y))
    assert float(L.mined_triplet_loss(mined, 0.4)) == pytest.approx(_np_loss(e, y, mining, 0.4, distance),
                                                                     rel=1e-4, abs=1e-5)


def test_instance_losses():
    rng = np.random.default_rng(6)
    emb = rng.standard_normal((8, 4)).astype(np.float32)
    ids = np.repeat(np.arange(4), 2)
    got = L.make_instance_loss("info_nce", temperature=0.1)(tf.constant(ids), tf.constant(emb))
    assert float(got) == pytest.approx(_np_info_nce(ids, emb, 0.1), rel=1e-4)
    got = L.make_instance_loss("triplet", distance="squared_euclidean", margin=0.3)(tf.constant(ids), tf.constant(emb))
    assert float(got) == pytest.approx(_np_loss(emb, ids, "all", 0.3, "squared_euclidean"), rel=1e-4)
    with pytest.raises(ValueError, match="instance_loss"):
        L.make_instance_loss("arcface")


@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_normalized_softmax_matches_loop_reference(temperature):
    rng = np.random.default_rng(5)
    e = rng.standard_normal((9, 6)).astype(np.float32) * 3.0    # not unit: the loss normalises
    w = rng.standard_normal((4, 6)).astype(np.float32)
    y = rng.integers(0, 4, 9)
    want = []
    for row, c in zip(e.astype(np.float64), y):
        cos = [row @ p / (np.linalg.norm(row) * np.linalg.norm(p)) for p in w.astype(np.float64)]
        logits = np.array(cos) / temperature
        want.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[c])
    got = L.normalized_softmax_loss(tf.constant(e), tf.constant(y), tf.constant(w), temperature)
    assert float(got) == pytest.approx(np.mean(want), rel=1e-4)
    # Rows sitting on their own proxy, with the others far, cost almost nothing at a low temperature.
    on_proxy = w[y] / np.linalg.norm(w[y], axis=1, keepdims=True)
    apart = np.eye(4, 6, dtype=np.float32)
    assert float(L.normalized_softmax_loss(apart[y], y, apart, 0.05)) < 1e-6
    assert float(L.normalized_softmax_loss(on_proxy, y, w, temperature)) < float(got)


def _np_info_nce(labels, emb, temperature):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    logits = e @ e.T / temperature
    n, total, anchors = len(e), 0.0, 0
    for a in range(n):
        others = [b for b in range(n) if b != a]
        log_den = np.log(np.sum(np.exp(logits[a, others])))
        pos = [b for b in others if labels[b] == labels[a]]
        if pos:
            total += -np.mean([logits[a, p] - log_den for p in pos])
            anchors += 1
    return total / max(anchors, 1)


def test_info_nce_matches_a_loop_over_anchors():
    from trainer.losses import info_nce_loss
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((10, 5)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 3, 4, 5])  # some anchors have no positive (2, 4, 5)
    got = float(info_nce_loss(tf.constant(labels), tf.constant(emb), 0.1))
    assert got == pytest.approx(_np_info_nce(labels, emb, 0.1), rel=1e-4)
    # Pulling each pair together lowers it.
    tight = emb.copy()
    tight[1], tight[3], tight[4], tight[7] = tight[0], tight[2], tight[2], tight[6]
    assert float(info_nce_loss(tf.constant(labels), tf.constant(tight), 0.1)) < got


def _np_koleo(emb, labels=None):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d = np.linalg.norm(e[:, None] - e[None], axis=-1)
    labels = np.arange(len(e)) if labels is None else np.asarray(labels)
    d[labels[:, None] == labels[None, :]] = np.inf  # self, and with labels every positive
    return -np.mean(np.log(d.min(axis=1)))


def test_koleo_is_minus_mean_log_nearest_distance():
    from trainer.losses import koleo_loss
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((7, 3)).astype(np.float32)
    assert float(koleo_loss(tf.constant(emb))) == pytest.approx(_np_koleo(emb), rel=1e-4)
    crowded = emb.copy()
    crowded[1] = crowded[0] + 1e-3
    assert float(koleo_loss(tf.constant(crowded))) > float(koleo_loss(tf.constant(emb)))
    # With labels, a positive (rows 0 and 1 share a label) is never the neighbour that counts.
    labels = np.array([0, 0, 1, 2, 3, 4, 5])
    got = float(koleo_loss(tf.constant(crowded), tf.constant(labels)))
    assert got == pytest.approx(_np_koleo(crowded, labels), rel=1e-4)
    assert got < float(koleo_loss(tf.constant(crowded)))
