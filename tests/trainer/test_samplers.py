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
