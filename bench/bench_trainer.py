"""Throughput of the trainer's hot paths on this machine (prints one JSON line per measurement).

    .venv/bin/python bench/bench_trainer.py
    .venv/bin/python bench/bench_trainer.py train --output /tmp/q --preset quality   # one training recipe
    .venv/bin/python bench/bench_trainer.py loss      # batch-all triplet loss: rows per positive pair vs cube
    .venv/bin/python bench/bench_trainer.py copyfeed  # photo copy edits vs the catalogue preset's training step
    .venv/bin/python bench/bench_trainer.py onednn    # that training step with TensorFlow's oneDNN kernels off / on

`markdown FILE...` turns the JSON lines of `train` runs into the table rows of BENCHMARKS.md.
The `train` form runs trainer.train.run(ARGS) in this process and prints one JSON line with the summary's
scores, wall seconds and CPU seconds (user + sys of this process and its children): the recipes in
BENCHMARKS.md "## Trainer" were measured this way, under `flock /tmp/heavy.lock`.

Without arguments: augment_batch (images/s), one training step of the default encoder + loss (images/s, per mining), the
blocked recall@1 over 10,000 embeddings (seconds), and the `loss` comparison. Numbers depend on what else runs on
the cores.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _report(name: str, **values) -> None:
    print(json.dumps({"bench": name, **values}), flush=True)


def bench_augment(n: int = 20000, batch: int = 160) -> None:
    from trainer.augment import augment_batch
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    t = time.perf_counter()
    for i in range(0, n, batch):
        augment_batch(images[i:i + batch], rng)
    dt = time.perf_counter() - t
    _report("augment_batch", images=n, batch=batch, seconds=round(dt, 3), images_per_s=round(n / dt))


# The encoder these step benchmarks time (BENCHMARKS.md quotes them): the second session's quality encoder,
# 'valid' padding. Today's --preset quality pads 'same' and costs about 1.7x per image.
QUALITY_VALID = {"filters": (32, 64, 128), "batch_norm": True, "dense_units": 256}


def _compiled_step(model, loss_fn, jit_compile: bool = False):
    """One compiled Adam training step (x, y) -> loss of `loss_fn(labels, embeddings)` on `model`."""
    import keras
    import tensorflow as tf

    opt = keras.optimizers.Adam(1e-3)

    @tf.function(jit_compile=jit_compile)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss
    return step


def bench_train_step(steps: int = 30) -> None:
    from trainer.encoder import build_encoder
    from trainer.losses import make_batch_loss
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (160, 28, 28, 1)).astype(np.float32)
    y = np.repeat(np.arange(10), 16)
    # The last variant compiles the step with XLA (jit_compile), to see whether it pays on this machine.
    for arch, mining, jit in (("default", "all", False), ("default", "semihard", False), ("default", "hard", False),
                              ("quality", "all", False), ("quality", "all", True)):
        model = build_encoder(**(QUALITY_VALID if arch == "quality" else {}))
        step = _compiled_step(model, make_batch_loss(mining=mining), jit_compile=jit)
        step(x, y)
        t = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        dt = time.perf_counter() - t
        _report("train_step", encoder=arch, mining=mining, jit_compile=jit, batch=160, steps=steps,
                images_per_s=round(160 * steps / dt))


def bench_triplet_rows(steps: int = 20, repeats: int = 3) -> None:
    """Batch-all triplet loss as trainer.losses computes it (one row of distances per positive pair, N x B)
    against the (B, B, B) cube of every triplet that it replaced: training steps of QUALITY_VALID per
    second, both in this process, interleaved, best of `repeats`; ratio = rows / cube."""
    import tensorflow as tf

    from trainer.encoder import build_encoder
    from trainer.losses import _safe_mean, all_pairs, distance_matrix, mined_triplet_loss, pair_masks

    def cube(dist, labels, margin):
        pos, neg = pair_masks(labels)
        loss = tf.nn.relu(dist[:, :, None] - dist[:, None, :] + margin)
        valid = tf.logical_and(tf.logical_and(pos[:, :, None], neg[:, None, :]), loss > 1e-16)
        return _safe_mean(loss, valid)

    def rows(dist, labels, margin):
        return mined_triplet_loss(all_pairs(dist, labels), margin)

    rng = np.random.default_rng(0)
    for batch in (160, 320):
        x = rng.integers(0, 256, (batch, 28, 28, 1)).astype(np.float32)
        y = np.repeat(np.arange(10), batch // 10)
        steps_fns = {}
        for name, miner in (("cube", cube), ("rows", rows)):
            steps_fns[name] = _compiled_step(build_encoder(**QUALITY_VALID),
                                             lambda labels, emb, miner=miner: miner(distance_matrix(emb), labels, 0.4))
            steps_fns[name](x, y)
        best = {name: 0.0 for name in steps_fns}
        for _ in range(repeats):
            for name, fn in steps_fns.items():
                t = time.perf_counter()
                for _ in range(steps):
                    fn(x, y)
                best[name] = max(best[name], batch * steps / (time.perf_counter() - t))
        _report("triplet_loss_rows_vs_cube", batch=batch, cube_images_per_s=round(best["cube"]),
                rows_images_per_s=round(best["rows"]), ratio=round(best["rows"] / best["cube"], 2))


def bench_onednn(rounds: int = 2) -> None:
    """The photo encoder's training step (the copyfeed bench) with TensorFlow's oneDNN kernels off and on,
    each in a fresh process (TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it starts), alternating, best
    of `rounds`: the ratio is what trainer/__init__.py's default buys on this machine."""
    import subprocess

    best = {"0": 0.0, "1": 0.0}
    for _ in range(rounds):
        for flag in ("0", "1"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "copyfeed"], capture_output=True, text=True,
                                 env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": flag}, check=True).stdout
            step = json.loads(out.strip().splitlines()[-1])["train_step_images_per_s"]
            best[flag] = max(best[flag], step)
    _report("onednn", step_images_per_s_off=best["0"], step_images_per_s_on=best["1"],
            speedup=round(best["1"] / best["0"], 2))


def bench_copy_feed(batches: int = 8, repeats: int = 3) -> None:
    """Is the model or the input pipeline the bottleneck of photo training? trainer.copy_edits' training edits
    (BatchAugmenter, one thread, as the trainer's prefetch thread runs them) against one training step of the
    --preset catalogue encoder + InfoNCE/KoLeo loss, in images/s, best of `repeats`, on the same batch."""
    import tensorflow as tf

    from trainer.copy_edits import BatchAugmenter
    from trainer.encoder import build_encoder
    from trainer.losses import info_nce_loss, koleo_loss
    from trainer.train import PRESETS, TrainConfig, encoder_kwargs
    import dataclasses

    cfg = dataclasses.replace(TrainConfig(), **{k: v for k, v in PRESETS["catalogue"].items()
                                                if k in TrainConfig.__dataclass_fields__})
    side = cfg.image_size
    spec = {"height": side, "width": side, "channels": 3, "dtype": "uint8", "value_range": [0, 255]}
    batch = cfg.classes_per_batch * cfg.per_class  # images per view
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:2 * side, 0:2 * side]
    sources = np.stack([((np.sin(xx / (3 + k % 7)) + np.cos(yy / (2 + k % 5))) * 60 + 128 + rng.normal(0, 10, xx.shape))
                        .clip(0, 255).astype(np.uint8)[..., None].repeat(3, -1) for k in range(batch)])
    aug = BatchAugmenter(side, mirror=True, trim=cfg.trim_borders)
    feed = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(batches):
            aug(sources, rng)
        feed.append(batches * batch / (time.perf_counter() - t))
    model = build_encoder(spec, **encoder_kwargs(cfg))
    opt = tf.keras.optimizers.Adam(1e-3)
    x = tf.constant(np.concatenate([aug(sources, rng), aug(sources, rng)]).astype(np.float32))
    ids = tf.constant(np.tile(np.arange(batch), 2))

    @tf.function(reduce_retracing=True)
    def step(x, ids):
        with tf.GradientTape() as tape:
            emb = model(x, training=True)
            loss = info_nce_loss(ids, emb, cfg.temperature) + cfg.koleo_weight * koleo_loss(emb, ids)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    step(x, ids)
    train = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(batches):
            step(x, ids)
        train.append(batches * 2 * batch / (time.perf_counter() - t))
    # A training step consumes 2 x batch views, of which 1.5 x batch are edited (the first view half the time).
    _report("copy_feed", edit_images_per_s=round(max(feed)), train_step_images_per_s=round(max(train)),
            edits_needed_per_trained_image=0.75,
            headroom=round(max(feed) / (0.75 * max(train)), 2), batch=f"2 x {batch}", side=side)


def bench_recall(n: int = 10000, dim: int = 64) -> None:
    from siamese_core.similarity import l2_normalize
    from trainer.evaluate import recall_at_k
    rng = np.random.default_rng(0)
    emb = l2_normalize(rng.standard_normal((n, dim)))
    labels = rng.integers(0, 10, n)
    t = time.perf_counter()
    recall_at_k(emb, labels, ks=(1, 5))
    _report("recall_at_k", items=n, dim=dim, seconds=round(time.perf_counter() - t, 3))


def bench_train(argv: list[str]) -> None:
    import resource

    from trainer.train import run

    t = time.perf_counter()
    summary = run(argv)
    wall = time.perf_counter() - t
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    keep = ("model_dir", "model_id", "seed_auc", "recall_at_1", "recall_at_5", "map_at_r", "epochs_run",
            "best_epoch", "train_seconds", "instance_recall_at_fmr", "unseen_classes")
    _report("train", argv=argv, wall_seconds=round(wall, 1), cpu_seconds=round(cpu, 1),
            load_average_1m=round(os.getloadavg()[0], 2), **{k: summary.get(k) for k in keep})


def markdown_rows(paths: list[str]) -> None:
    """Print the `train` JSON lines of the given files as BENCHMARKS.md table rows."""
    print("| command (`.venv/bin/python bench/bench_trainer.py train ...`) | test AUC | recall@1 | MAP@R | "
          "instance recall at FMR 1e-2 / 1e-3 / 1e-4 | unseen AUC / recall@1 | epochs (best) | train s | "
          "wall s | CPU s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.startswith("{\"bench\"")]
        for r in (r for r in rows if r.get("bench") == "train"):
            inst = r.get("instance_recall_at_fmr") or {}
            unseen = r.get("unseen_classes") or {}

            def fmt(v):
                return "-" if v is None else f"{v:.4f}"
            print(f"| `{' '.join(r['argv'])}` | {fmt(r['seed_auc'])} | {fmt(r['recall_at_1'])} | "
                  f"{fmt(r.get('map_at_r'))} | "
                  f"{' / '.join(fmt(inst.get(k)) for k in ('0.01', '0.001', '0.0001'))} | "
                  f"{fmt(unseen.get('seed_protocol_auc'))} / {fmt(unseen.get('recall_at_1'))} | "
                  f"{r['epochs_run']} ({r['best_epoch']}) | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} | "
                  f"{r['cpu_seconds']:.0f} | {r['load_average_1m']} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        bench_train(sys.argv[2:])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "markdown":
        markdown_rows(sys.argv[2:])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "onednn":
        bench_onednn()
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "copyfeed":
        bench_copy_feed()
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "loss":
        bench_triplet_rows()
        sys.exit(0)
    bench_augment()
    bench_recall()
    bench_train_step()
    bench_triplet_rows()
