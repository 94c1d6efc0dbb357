"""bench/bench_train_jax.py checks its JAX loss against `reference_loss` before it times anything (the suite
has no JAX): here that reference is held to trainer.losses, the TensorFlow loss the trainer optimises."""
import os

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from tests.scripts import load_script
from trainer import losses as L


def _bench():
    return load_script("bench/bench_train_jax.py")


@pytest.mark.parametrize("margin, temperature, weight", [(0.4, 0.05, 1.0), (0.2, 0.1, 0.5), (0.4, 0.05, 0.0)])
def test_reference_loss_is_the_trainers_loss(margin, temperature, weight):
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(5), 4)
    emb = rng.standard_normal((20, 8))
    proxies = rng.standard_normal((5, 8))
    want = float(L.mined_triplet_loss(L.all_pairs(L.distance_matrix(emb.astype(np.float32)), labels), margin)
                 + weight * L.normalized_softmax_loss(emb.astype(np.float32), labels, proxies.astype(np.float32),
                                                      temperature))
    got = _bench().reference_loss(emb, labels, proxies, margin, temperature, weight)
    assert got == pytest.approx(want, rel=1e-5)
    assert os.environ.get("KERAS_BACKEND") != "jax"  # loading the script leaves Keras's backend alone
