"""Training throughput of the `--preset quality` encoder, and recipes trained, on a GPU machine without TensorFlow.

    python bench/bench_train_jax.py                    # throughput: one JSON line per measurement
    python bench/bench_train_jax.py --batches 160,640 --epoch_items 54000
    python bench/bench_train_jax.py --recipe "--preset quality --convs_per_stage 2" --recipe "..."
                                                       # train each recipe on Fashion-MNIST, score the test split

Why JAX: the lent GPU machines (BENCHMARKS.md "Trainer", GPU) carry JAX with CUDA but no TensorFlow, and
cannot install it (no package registry there; TensorFlow's wheel is ~600 MB, far over what the device
tool carries). trainer.encoder builds the tower from built-in Keras layers only, so the very same encoder
(trainer.train.encoder_kwargs of the preset's TrainConfig) runs under Keras 3's JAX backend. The training
loop of trainer.train is TensorFlow's and is not what runs here; this script times the same work:

  step   one jit-compiled training step on a batch already on the device: forward in training mode
         (batch norm, dropout), the batch-all cosine triplet loss (margin 0.4) plus the normalized-softmax
         proxy loss (temperature 0.05, weight 1), backward, Adam. Images per second for P x K batches of
         10 x 16 (the preset's) and larger ones, in float32 and in mixed bfloat16.
  feed   the same step fed by the trainer's own batch generator (trainer.train._batches in its
         _prefetch thread: P x K sampling and near-duplicate edits in NumPy on the CPU) for
         `--epoch_items` images, reading the loss back every step as trainer.train does: whether the CPU
         side keeps up with the GPU.

The loss follows the definitions in trainer.losses (there computed by TensorFlow); before anything else, the
JAX loss is checked against `reference_loss`, a float64 NumPy evaluation of those definitions, on random
embeddings (tests/bench holds that reference to trainer.losses itself).
Pixels are random (throughput does not depend on them); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def _report(name: str, **values) -> None:
    print(json.dumps({"bench": name, **values}), flush=True)


def _positives(labels, k: int):
    """Column indices (B, k-1) of each row's positives in a batch where every label occurs exactly k times."""
    import jax
    import jax.numpy as jnp
    same = labels[:, None] == labels[None, :]
    pos = same & ~jnp.eye(labels.shape[0], dtype=bool)
    return jax.lax.top_k(pos.astype(jnp.float32), k - 1)[1]


def quality_loss(emb, labels, proxies, k: int, margin: float, temperature: float, proxy_weight: float):
    """Batch-all cosine triplet loss + proxy_weight * normalized-softmax loss, for P x K batches.

    emb (B, D) float32, labels (B,) int32 class numbers 0..C-1 each occurring k times, proxies (C, D).
    Positive pairs come from `_positives` (static shape, as jit needs), one row of distances per pair as
    in trainer.losses._positive_pair_rows.
    """
    import jax.numpy as jnp
    e = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    dist = 1.0 - e @ e.T
    pos = _positives(labels, k)
    d_ap = jnp.take_along_axis(dist, pos, axis=1)                       # (B, k-1)
    neg = labels[:, None] != labels[None, :]                             # (B, B)
    loss = jnp.maximum(d_ap[:, :, None] - dist[:, None, :] + margin, 0.0)  # (B, k-1, B)
    valid = neg[:, None, :] & (loss > 1e-16)
    triplet = jnp.sum(jnp.where(valid, loss, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    w = proxies / jnp.maximum(jnp.linalg.norm(proxies, axis=-1, keepdims=True), 1e-12)
    logits = e @ w.T / temperature
    log_p = logits - jnp.max(logits, axis=1, keepdims=True)
    log_p = log_p - jnp.log(jnp.sum(jnp.exp(log_p), axis=1, keepdims=True))
    softmax = -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))
    return triplet + proxy_weight * softmax


def reference_loss(emb: np.ndarray, labels: np.ndarray, proxies: np.ndarray, margin: float,
                   temperature: float, proxy_weight: float) -> float:
    """The same loss in float64 NumPy, straight from trainer.losses' definitions (every triplet)."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    d = 1.0 - e @ e.T
    same = labels[:, None] == labels[None, :]
    pos = same & ~np.eye(len(labels), dtype=bool)
    cube = np.maximum(d[:, :, None] - d[:, None, :] + margin, 0.0)
    valid = pos[:, :, None] & ~same[:, None, :] & (cube > 1e-16)
    triplet = cube[valid].sum() / max(valid.sum(), 1)
    w = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
    logits = e @ w.T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(triplet - proxy_weight * log_p[np.arange(len(labels)), labels].mean())


def _trainer(config, n_classes: int, k: int, total_steps: int | None = None):
    """(state, step, model): a jit-compiled step (state, x, y) -> (loss, state) of the config's encoder +
    loss; with total_steps the learning rate follows trainer.train's cosine decay over that many steps."""
    import jax
    import keras

    from trainer.encoder import DEFAULT_INPUT_SPEC, build_encoder
    from trainer.train import encoder_kwargs, initial_proxies, make_optimizer

    keras.utils.set_random_seed(config.seed)
    model = build_encoder(DEFAULT_INPUT_SPEC, **encoder_kwargs(config))
    proxies = keras.Variable(initial_proxies(config, n_classes))
    optimizer = (keras.optimizers.Adam(config.learning_rate) if total_steps is None
                 else make_optimizer(config, total_steps))
    trainable = model.trainable_variables + [proxies]
    optimizer.build(trainable)

    def loss_fn(weights, non_trainable, x, y):
        emb, non_trainable = model.stateless_call(weights[:-1], non_trainable, x, training=True)
        loss = quality_loss(emb.astype("float32"), y, weights[-1], k, config.margin,
                            config.proxy_temperature, config.proxy_weight)
        return loss, non_trainable

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    @jax.jit
    def step(state, x, y):
        weights, non_trainable, opt_vars = state
        (loss, non_trainable), grads = grad_fn(weights, non_trainable, x, y)
        weights, opt_vars = optimizer.stateless_apply(opt_vars, grads, weights)
        return loss, (weights, non_trainable, opt_vars)

    state = ([v.value for v in trainable], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    return state, step, model


def check_loss(config) -> float:
    """Relative error of the JAX loss against the float64 NumPy reference on random 10 x 16 batches."""
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 16)
    worst = 0.0
    for _ in range(3):
        emb = rng.standard_normal((160, config.embedding_dim)).astype(np.float32)
        proxies = rng.standard_normal((10, config.embedding_dim)).astype(np.float32)
        got = float(quality_loss(jnp.asarray(emb), jnp.asarray(labels, jnp.int32), jnp.asarray(proxies), 16,
                                 config.margin, config.proxy_temperature, config.proxy_weight))
        want = reference_loss(emb.astype(np.float64), labels, proxies.astype(np.float64), config.margin,
                              config.proxy_temperature, config.proxy_weight)
        worst = max(worst, abs(got - want) / abs(want))
    return worst


def bench_steps(config, batches: list[int], steps: int, repeats: int, precision: str) -> None:
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    for batch in batches:
        k = batch // config.classes_per_batch
        state, step, _ = _trainer(config, config.classes_per_batch, k)
        x = jnp.asarray(rng.integers(0, 256, (batch, 28, 28, 1)).astype(np.float32))
        y = jnp.asarray(np.repeat(np.arange(config.classes_per_batch), k), jnp.int32)
        t = time.perf_counter()
        loss, state = step(state, x, y)
        loss.block_until_ready()
        compile_s = time.perf_counter() - t
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(steps):
                loss, state = step(state, x, y)
            jax.block_until_ready(state)
            rates.append(batch * steps / (time.perf_counter() - t))
        _report("jax_train_step", device=str(jax.devices()[0]), precision=precision, batch=batch,
                p_x_k=f"{config.classes_per_batch} x {k}", steps=steps, repeats=repeats,
                images_per_s_median=round(float(np.median(rates))), images_per_s_all=[round(r) for r in rates],
                first_step_s=round(compile_s, 2), loss_finite=bool(np.isfinite(float(loss))))


def bench_feed(config, epoch_items: int, precision: str) -> None:
    """The step fed by trainer.train's own batch generator for `epoch_items` images (one epoch's worth)."""
    import jax
    import jax.numpy as jnp

    from trainer.augment import augment_batch
    from trainer.samplers import PKSampler
    from trainer.train import _batches, _prefetch
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), epoch_items // 10)
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    p, k = config.classes_per_batch, config.per_class
    sampler = PKSampler(labels, p=p, k=k, batches_per_epoch=len(labels) // (p * k))
    state, step, _ = _trainer(config, 10, k)
    warm = next(_batches(images, labels, sampler, rng, config, augment_batch, images))
    float(step(state, jnp.asarray(warm[0]), jnp.asarray(warm[1], jnp.int32))[0])
    t, seen, losses = time.perf_counter(), 0, []
    for x, y, _ in _prefetch(_batches(images, labels, sampler, rng, config, augment_batch, images)):
        loss, state = step(state, jnp.asarray(x), jnp.asarray(y, jnp.int32))
        losses.append(float(loss))  # trainer.train reads every step's loss (collapse check, progress)
        seen += len(x)
    seconds = time.perf_counter() - t
    _report("jax_train_fed_by_trainer_batches", device=str(jax.devices()[0]), precision=precision,
            p_x_k=f"{p} x {k}", augment_prob=config.augment_prob, images=seen,
            seconds=round(seconds, 1), images_per_s=round(seen / seconds),
            loss_first_last=[round(losses[0], 4), round(losses[-1], 4)])


def train_recipe(argv: list[str]) -> dict:
    """Train one trainer.train recipe (its own flags) under JAX on Fashion-MNIST and score the test split.

    What trainer.train does for class training with one view, the proxy loss on and the batch-all triplet
    loss: same split, sampler, batch generator, encoder, loss, Adam with cosine decay, the best epoch by
    validation AUC; the scores are trainer.train.evaluate_labelled's. Also scored: the same embeddings
    averaged with those of the mirrored images (flip test-time augmentation).
    """
    import jax
    import jax.numpy as jnp

    from siamese_core.similarity import l2_normalize
    from trainer import evaluate as ev
    from trainer.augment import augment_batch
    from trainer.samplers import PKSampler
    from trainer.train import _batches, _held_out, _load, _prefetch, config_from_flags, evaluate_labelled
    config = config_from_flags(argv)
    if config.views != 1 or config.proxy_weight <= 0 or config.loss != "triplet" or config.mining != "all" \
            or config.distance != "cosine" or config.data != "fashion_mnist" or config.train_classes:
        raise SystemExit("this JAX runner covers Fashion-MNIST class training with --views 1, the proxy loss "
                         "and the batch-all cosine triplet loss")
    rng = np.random.default_rng(config.seed)
    loaded = _load(config, rng)
    images, labels = loaded["images"], loaded["labels"]
    train_idx, val_idx, _ = _held_out(labels, "class", config)
    x_train, y_train = images[train_idx], labels[train_idx]
    p, k = config.classes_per_batch, config.per_class
    sampler = PKSampler(y_train, p=p, k=k, batches_per_epoch=len(y_train) // (p * k))
    state, step, model = _trainer(config, 10, k, total_steps=len(sampler) * config.epochs)

    def embed(weights, non_trainable, x):
        out = []
        for i in range(0, len(x), 2000):
            batch = jnp.asarray(x[i:i + 2000, ..., None].astype(np.float32))
            out.append(np.asarray(model.stateless_call(weights, non_trainable, batch, training=False)[0]))
        return np.concatenate(out).astype(np.float32)

    t0, history, best = time.perf_counter(), [], (-1.0, None, 0)
    for epoch in range(1, config.epochs + 1):
        losses = []
        for x, y, _ in _prefetch(_batches(x_train, y_train, sampler, rng, config, augment_batch, x_train)):
            loss, state = step(state, jnp.asarray(x), jnp.asarray(y, jnp.int32))
            losses.append(loss)
        weights, non_trainable = state[0][:-1], state[1]
        val_auc = ev.seed_protocol(embed(weights, non_trainable, images[val_idx]), labels[val_idx],
                                   seed=config.seed)["auc"]
        history.append([epoch, round(float(np.mean(jax.device_get(losses))), 4), round(val_auc, 4)])
        if val_auc > best[0]:
            best = (val_auc, (weights, non_trainable), epoch)
        elif epoch - best[2] >= config.patience:
            break
    seconds = time.perf_counter() - t0
    test_x, test_y = loaded["test_images"], loaded["test_labels"]
    emb = embed(*best[1], test_x)
    res = evaluate_labelled(emb, test_y, config.seed)
    flip = l2_normalize(emb + embed(*best[1], test_x[:, :, ::-1]))
    res_flip = evaluate_labelled(flip, test_y, config.seed)
    out = {"argv": argv, "test_auc": round(res["auc"], 4), "recall_at_1": round(res["recall"][1], 4),
           "recall_at_5": round(res["recall"][5], 4), "map_at_r": round(res["map_at_r"], 4),
           "flip_tta_auc": round(res_flip["auc"], 4), "flip_tta_recall_at_1": round(res_flip["recall"][1], 4),
           "best_epoch": best[2], "epochs_run": len(history), "history": history, "train_seconds": round(seconds, 1)}
    _report("jax_recipe", device=str(jax.devices()[0]), **out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="quality")
    parser.add_argument("--batches", default="160,640,1280", help="batch sizes (multiples of 10 classes)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--epoch_items", type=int, default=54000, help="images of the fed run (0: skip it)")
    parser.add_argument("--recipe", action="append", default=[],
                        help="instead of the throughput runs: train this recipe (trainer.train flags in one "
                             "string, e.g. '--preset quality --convs_per_stage 2') and score it; repeatable")
    args = parser.parse_args(argv)

    import jax
    import keras

    from trainer.train import PRESETS, TrainConfig
    if keras.backend.backend() != "jax":
        raise SystemExit("run with KERAS_BACKEND=jax (this script times the JAX backend)")
    config = TrainConfig(**PRESETS[args.preset], preset=args.preset)
    _report("environment", devices=[str(d) for d in jax.devices()], jax=jax.__version__, keras=keras.__version__,
            cpu_count=os.cpu_count(), preset=args.preset)
    _report("loss_check", max_relative_error=check_loss(config))
    if args.recipe:
        import shlex
        for recipe in args.recipe:
            train_recipe(shlex.split(recipe))
        return
    for precision in args.precisions.split(","):
        keras.mixed_precision.set_global_policy(precision)
        bench_steps(config, [int(b) for b in args.batches.split(",")], args.steps, args.repeats, precision)
        if args.epoch_items:
            bench_feed(config, args.epoch_items, precision)
    keras.mixed_precision.set_global_policy("float32")


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is first imported (not on import: tests)
    main()
