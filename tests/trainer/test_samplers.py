import numpy as np
import pytest

from trainer.samplers import PKSampler, class_pairs, class_triplets, instance_triplets


def _labels():
    # Unbalanced classes, one singleton class (7).
    return np.array([0] * 50 + [1] * 20 + [2] * 5 + [3] * 30 + [7])


def test_triplets_negatives_never_share_the_anchor_class():
    labels = _labels()
    rng = np.random.default_rng(0)
    a, p, n = class_triplets(labels, 5000, rng)
    assert a.shape == p.shape == n.shape == (5000,)
    assert np.all(labels[a] == labels[p])
    assert np.all(a != p)
    assert np.all(labels[a] != labels[n])
    assert not np.any(labels[a] == 7)  # a singleton cannot be an anchor (no positive)
    # Negatives cover every other class, the singleton included.
    assert set(labels[n]) == {0, 1, 2, 3, 7}


def test_instance_triplets():
    labels = _labels()
    rng = np.random.default_rng(1)
    a, p, n = instance_triplets(labels, 3000, rng)
    assert np.array_equal(a, p)
    assert np.all(n != a) and np.all(labels[n] != labels[a])
    a, p, n = instance_triplets(labels, 3000, rng, same_class_negatives=True)
    assert np.all(n != a), "a negative must never be the anchor's own image"
    assert np.all(labels[n] == labels[a])


def test_pairs():
    labels = _labels()
    left, right, same = class_pairs(labels, 4000, np.random.default_rng(2), positive_fraction=0.3)
    np.testing.assert_array_equal(labels[left] == labels[right], same)
    assert 0.25 < same.mean() < 0.35
    assert np.all(left != right)


def test_pk_batches_are_balanced_and_cover_the_epoch():
    labels = np.repeat(np.arange(10), 40)
    sampler = PKSampler(labels, p=10, k=8)
    assert len(sampler) == 5 and sampler.batch_size == 80
    batches = list(sampler.epoch(np.random.default_rng(3)))
    assert len(batches) == 5
    for b in batches:
        assert b.shape == (80,)
        assert np.array_equal(np.bincount(labels[b], minlength=10), [8] * 10)
        assert len(set(b)) == 80
    # 5 batches x 8 per class = exactly each class's 40 images: every image once.
    assert sorted(np.concatenate(batches)) == list(range(400))


def test_pk_fewer_classes_and_small_classes():
    labels = _labels()
    sampler = PKSampler(labels, p=3, k=6, batches_per_epoch=50)
    rng = np.random.default_rng(4)
    for b in sampler.epoch(rng):
        counts = np.bincount(labels[b])
        assert sorted(counts[counts > 0]) == [6, 6, 6]
    # Same seed, same batches.
    one = [b.tolist() for b in sampler.epoch(np.random.default_rng(5))]
    two = [b.tolist() for b in sampler.epoch(np.random.default_rng(5))]
    assert one == two
    with pytest.raises(ValueError):
        PKSampler(labels, p=3, k=1)
    with pytest.raises(ValueError):
        PKSampler(labels, p=6, k=2)


def test_partners():
    from trainer.samplers import other_class_partners, same_class_partners
    labels = np.array([0, 0, 1, 1, 1, 2, 2])
    anchors = np.arange(7).repeat(200)
    rng = np.random.default_rng(6)
    pos = same_class_partners(labels, anchors, rng)
    neg = other_class_partners(labels, anchors, rng)
    assert np.all(labels[pos] == labels[anchors]) and np.all(pos != anchors)
    assert np.all(labels[neg] != labels[anchors])
    # uniform: anchor 2's partners are 3 and 4, about half each
    assert 60 < np.sum(pos[anchors == 2] == 3) < 140
    with pytest.raises(ValueError, match="single image"):
        same_class_partners(np.array([0, 1, 1]), np.array([0]), rng)


def test_pair_triplets_negatives_come_from_other_pairs():
    from trainer.samplers import pair_triplets
    pair_ids = np.repeat(np.arange(40), 2)
    a, p, n = pair_triplets(pair_ids, 4000, np.random.default_rng(3))
    assert np.all(pair_ids[a] == pair_ids[p]) and np.all(a != p)
    assert np.all(pair_ids[n] != pair_ids[a])
    assert len(set(pair_ids[n])) == 40


def test_instance_sampler_batches_distinct_images():
    from trainer.samplers import InstanceSampler
    s = InstanceSampler(100, 16)
    batches = list(s.epoch(np.random.default_rng(0)))
    assert len(batches) == len(s) == 6
    for b in batches:
        assert len(b) == 16 and len(set(b.tolist())) == 16
    assert len(set(np.concatenate(batches).tolist())) == 96  # no repeats within an epoch
    with pytest.raises(ValueError):
        InstanceSampler(10, 11)


def test_in_batch_negatives_never_share_class_or_instance():
    """The trainer's batches (P x K, two views) through the loss masks: every pair the class loss treats as a
    negative has different classes, every pair the instance loss treats as a negative is two different
    images, and both views of an image are each other's instance positive."""
    tf = pytest.importorskip("tensorflow")
    from trainer.losses import pair_masks
    labels = _labels()
    sampler = PKSampler(labels, p=3, k=4, batches_per_epoch=20)
    for idx in sampler.epoch(np.random.default_rng(5)):
        ids = np.tile(idx, 2)                    # two views, as trainer.train._batches builds them
        y = labels[ids]
        _, class_neg = (np.asarray(m) for m in pair_masks(tf.constant(y)))
        inst_pos, inst_neg = (np.asarray(m) for m in pair_masks(tf.constant(ids)))
        a, n = np.nonzero(class_neg)
        assert len(a) and np.all(y[a] != y[n]) and np.all(ids[a] != ids[n])
        a, n = np.nonzero(inst_neg)
        assert np.all(ids[a] != ids[n])
        b = len(idx)
        assert np.all(inst_pos[np.arange(b), np.arange(b) + b])
