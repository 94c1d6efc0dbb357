"""Train the encoder on Fashion-MNIST with an in-batch triplet (or contrastive) loss and export the artefact.

    python -m trainer.train --output models/fmnist            # or: siamese-dedup train --output ...

Steps: load the train split and hold out a slice of it (validation for early stopping + a calibration set
that never trains and never picks epochs), train on class-balanced P x K batches of augmented images,
check for collapse each epoch, keep the best weights by validation ROC AUC, then evaluate on the TEST
split (seed protocol AUC, recall@k), calibrate thresholds on the calibration set ("class" and "instance"),
write roc.png and similarity_hist.png, and export model.keras + model_card.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import queue
import sys
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from trainer import evaluate as ev
from trainer.augment import augment_batch
from trainer.data import load_fashion_mnist
from trainer.samplers import PKSampler

COLLAPSE_MEAN_COSINE = 0.98


class TrainingCollapsed(RuntimeError):
    """The encoder maps everything to (nearly) the same point: training cannot recover by itself."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides the trained model (recorded in the model card).

    A batch holds `classes_per_batch` (P) classes x `per_class` (K) images x `views` views: 10 x 8 x 2 =
    160 embeddings by default. The class loss (`loss`, `mining`, `margin`, `distance`) pulls images of one
    class together and pushes other classes `margin` further away. With views=2 every image also appears as
    a second, edited copy (trainer.augment), and an instance triplet loss (weight `instance_weight`, margin
    `instance_margin`) asks that copy to be closer than any other image, same class included: that is
    what makes near-duplicates stand out from mere look-alikes. The first view is edited with probability
    `augment_prob`. An epoch is len(train) embeddings of work (so with views=2 half the images, twice each).
    """
    output_dir: str = "model"
    embedding_dim: int = 64
    epochs: int = 3
    classes_per_batch: int = 10
    per_class: int = 8
    loss: str = "triplet"            # "triplet" | "contrastive"
    margin: float = 0.4
    distance: str = "cosine"         # "cosine" | "squared_euclidean"
    mining: str = "all"              # "all" | "semihard" | "hard"
    learning_rate: float = 2e-3
    seed: int = 0
    augment: bool = True
    augment_prob: float = 0.5
    views: int = 2
    instance_weight: float = 1.0
    instance_margin: float = 0.15
    validation_split: float = 0.1    # of the train split: held out for validation + calibration
    validation_items: int = 2000     # the part of the held-out slice used for early stopping
    calibration_items: int = 3000    # the part used to calibrate thresholds (all pairs: ~4.5 M)
    patience: int = 2
    max_train_items: int | None = None
    max_test_items: int | None = None
    data_dir: str | None = None
    verbose: bool = True


def _log(config: TrainConfig, message: str) -> None:
    if config.verbose:
        print(message, file=sys.stderr, flush=True)


# --- data -------------------------------------------------------------------------------------------------

def split_train(labels: np.ndarray, config: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, validation, calibration) of the train split, disjoint, stratified by class.

    The held-out slice is `validation_split` of the items (at least 20 per part for tiny runs), shuffled
    with the seed, then cut into validation and calibration parts.
    """
    rng = np.random.default_rng(config.seed)
    n = len(labels)
    held = max(40, int(round(n * config.validation_split)))
    if held >= n - 20:
        raise ValueError(f"{n} training items are too few to hold out validation and calibration sets")
    # Stratify: interleave classes so any prefix of `order` is roughly class-balanced.
    order = rng.permutation(n)
    ranks = np.empty(n, np.int64)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        ranks[members] = np.arange(len(members))
    order = order[np.lexsort((rng.random(n), ranks[order]))]
    held_idx = order[:held]
    n_val = min(config.validation_items, held // 2)
    n_cal = min(config.calibration_items, held - n_val)
    return np.sort(order[held:]), held_idx[:n_val], held_idx[n_val:n_val + n_cal]


def _batches(images: np.ndarray, labels: np.ndarray, sampler: PKSampler, rng: np.random.Generator,
             config: TrainConfig) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(pixels float32 (B, H, W, 1), class labels (B,), instance ids (B,)) for one epoch; B = views*P*K."""
    for idx in sampler.epoch(rng):
        b = len(idx)
        idx = np.tile(idx, config.views)
        x = images[idx]
        if config.augment:
            # The first view is edited with probability augment_prob; further views always are, so each
            # image is paired with a real near-duplicate of itself (never a pixel-identical twin).
            edit = rng.random(len(idx)) < config.augment_prob
            edit[b:] = True
            edit = np.flatnonzero(edit)
            if len(edit):
                x[edit] = augment_batch(x[edit], rng)
        yield x[..., None].astype(np.float32), labels[idx], idx


def _prefetch(generator: Iterator, size: int = 4) -> Iterator:
    """Run `generator` in a background thread (numpy releases the GIL), `size` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def work():
        try:
            for item in generator:
                q.put(item)
            q.put(done)
        except BaseException as err:  # hand the error to the consumer
            q.put(err)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


# --- training ---------------------------------------------------------------------------------------------

def _mean_pairwise_cosine(emb: np.ndarray) -> float:
    """Mean cosine over distinct pairs of unit rows: (|sum|^2 - n) / (n (n - 1))."""
    n = len(emb)
    s = emb.sum(axis=0, dtype=np.float64)
    return float((s @ s - n) / max(n * (n - 1), 1))


def _check_collapse(config: TrainConfig, epoch: int, loss: float, val_emb: np.ndarray) -> float:
    mean_cos = _mean_pairwise_cosine(val_emb)
    if mean_cos > COLLAPSE_MEAN_COSINE:
        raise TrainingCollapsed(
            f"epoch {epoch}: embeddings collapsed (mean pairwise cosine {mean_cos:.4f} > "
            f"{COLLAPSE_MEAN_COSINE}): every image maps to nearly the same vector. Try a lower "
            f"--learning_rate, --mining all or semihard instead of hard, or a smaller --margin.")
    if config.loss == "triplet" and abs(loss - config.margin) < 0.01 * config.margin:
        raise TrainingCollapsed(
            f"epoch {epoch}: the triplet loss is stuck at the margin ({loss:.4f} ~ {config.margin}): "
            f"positives and negatives are equally far apart, nothing is being learnt. Try a lower "
            f"--learning_rate or --mining all.")
    return mean_cos


def train(config: TrainConfig) -> dict:
    """Train, evaluate, calibrate and export. Returns a summary dict (paths, scores, seconds)."""
    t_start = time.perf_counter()
    import keras
    import tensorflow as tf

    from trainer.encoder import DEFAULT_INPUT_SPEC, build_encoder
    from trainer.export import export_encoder
    from trainer.losses import make_batch_loss

    keras.utils.set_random_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    images, labels = load_fashion_mnist("train", config.data_dir)
    if config.max_train_items:
        keep = np.sort(rng.permutation(len(labels))[:config.max_train_items])
        images, labels = images[keep], labels[keep]
    train_idx, val_idx, cal_idx = split_train(labels, config)
    x_train, y_train = images[train_idx], labels[train_idx]
    n_classes = len(np.unique(y_train))
    p = min(config.classes_per_batch, n_classes)
    # An epoch is len(train) embeddings' worth of work whatever the number of views, so the time per epoch
    # stays the same; with views=2 it visits half of the images, each twice.
    sampler = PKSampler(y_train, p=p, k=config.per_class,
                        batches_per_epoch=max(1, len(y_train) // (config.views * p * config.per_class)))
    steps_per_epoch = len(sampler)
    _log(config, f"train {len(train_idx)} items, validation {len(val_idx)}, calibration {len(cal_idx)}; "
                 f"{steps_per_epoch} batches of {config.views} x {p} x {config.per_class} per epoch")

    model = build_encoder(DEFAULT_INPUT_SPEC, config.embedding_dim)
    schedule = keras.optimizers.schedules.CosineDecay(
        config.learning_rate, decay_steps=max(1, steps_per_epoch * config.epochs), alpha=0.05)
    optimizer = keras.optimizers.Adam(schedule)
    class_loss = make_batch_loss(config.loss, mining=config.mining, distance=config.distance,
                                 margin=config.margin)
    instance_loss = make_batch_loss("triplet", mining="all", distance=config.distance,
                                    margin=config.instance_margin)
    use_instances = config.views > 1 and config.instance_weight > 0

    @tf.function(reduce_retracing=True, autograph=False)  # no tensor-dependent Python control flow
    def train_step(x, y, ids):
        with tf.GradientTape() as tape:
            emb = model(x, training=True)
            loss = class_loss(y, emb)
            total = loss + config.instance_weight * instance_loss(ids, emb) if use_instances else loss
        grads = tape.gradient(total, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss, total

    # A compiled inference call: about twice as fast as calling the model eagerly batch by batch.
    predict = tf.function(lambda batch: model(batch, training=False), reduce_retracing=True, autograph=False)

    def embed(x):
        return ev.embed_images(model, x, predict_fn=predict)

    history, best = [], {"auc": -1.0, "epoch": 0, "weights": None}
    t_train = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        t_epoch = time.perf_counter()
        losses, totals = [], []
        for x, y, ids in _prefetch(_batches(x_train, y_train, sampler, rng, config)):
            loss, total = train_step(x, y, ids)
            losses.append(float(loss))
            totals.append(float(total))
            if not math.isfinite(totals[-1]):
                raise TrainingCollapsed(f"epoch {epoch}: loss became {totals[-1]}; try a lower --learning_rate")
        epoch_loss = float(np.mean(totals))
        val_emb = embed(images[val_idx])
        # The margin test looks at the class loss alone (the instance term has its own margin).
        mean_cos = _check_collapse(config, epoch, float(np.mean(losses)), val_emb)
        val_auc = ev.seed_protocol(val_emb, labels[val_idx], seed=config.seed)["auc"]
        seconds = time.perf_counter() - t_epoch
        history.append({"epoch": epoch, "loss": round(epoch_loss, 5), "val_auc": round(val_auc, 5),
                        "mean_pairwise_cosine": round(mean_cos, 4), "seconds": round(seconds, 1)})
        _log(config, f"epoch {epoch}/{config.epochs}: loss {epoch_loss:.4f}  val AUC {val_auc:.4f}  "
                     f"mean cos {mean_cos:.3f}  {seconds:.0f}s")
        if val_auc > best["auc"]:
            best = {"auc": val_auc, "epoch": epoch, "weights": [w.copy() for w in model.get_weights()]}
        elif epoch - best["epoch"] >= config.patience:
            _log(config, f"early stop: no better validation AUC for {config.patience} epochs")
            break
    train_seconds = time.perf_counter() - t_train
    model.set_weights(best["weights"])
    _log(config, f"best epoch {best['epoch']} (val AUC {best['auc']:.4f}); trained in {train_seconds:.0f}s")

    # Test split: seed protocol + retrieval.
    test_images, test_labels = load_fashion_mnist("test", config.data_dir)
    if config.max_test_items:
        test_images, test_labels = test_images[:config.max_test_items], test_labels[:config.max_test_items]
    test_emb = embed(test_images)
    seed = ev.seed_protocol(test_emb, test_labels, seed=config.seed)
    recall = ev.recall_at_k(test_emb, test_labels, ks=(1, 5))

    # Calibration on held-out TRAIN images (never the test split, never trained on).
    cal_images, cal_labels = images[cal_idx], labels[cal_idx]
    cal_emb = embed(cal_images)
    same, different = ev.all_pair_scores(cal_emb, cal_labels)
    by_class = ev.calibrate_class(cal_emb, cal_labels, pair_scores=(same, different))
    by_instance = ev.calibrate_instance(embed, cal_images, seed=config.seed, originals=cal_emb,
                                        impostor=np.concatenate([same, different]))
    thresholds = {"instance": by_instance["thresholds"], "class": by_class["thresholds"]}

    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    plots = {
        "roc": ev.plot_roc({"test seed protocol": (seed["genuine"], seed["impostor"]),
                            "class (calibration set)": (by_class["genuine"], by_class["impostor"]),
                            "instance (calibration set)": (by_instance["genuine"], by_instance["impostor"])},
                           os.path.join(out, "roc.png"),
                           aucs={"test seed protocol": seed["auc"], "class (calibration set)": by_class["auc"],
                                 "instance (calibration set)": by_instance["auc"]}),
        "similarity_hist": ev.plot_similarity_hist(
            {"test seed protocol": (seed["genuine"], seed["impostor"]),
             "class": (by_class["genuine"], by_class["impostor"]),
             "instance": (by_instance["genuine"], by_instance["impostor"])},
            os.path.join(out, "similarity_hist.png"), thresholds),
    }

    metrics = {
        "seed_protocol_auc": seed["auc"], "seed_protocol_pairs": seed["pairs"], "seed_protocol_split": "test",
        "recall_at_1": recall[1], "recall_at_5": recall[5], "test_items": int(len(test_labels)),
        "validation_auc": best["auc"],
        "class_auc": by_class["auc"], "instance_auc": by_instance["auc"],
        "class_genuine_pairs": int(len(by_class["genuine"])), "class_impostor_pairs": int(len(by_class["impostor"])),
        "instance_genuine_pairs": int(len(by_instance["genuine"])),
        "instance_impostor_pairs": int(len(by_instance["impostor"])),
    }
    training = {**dataclasses.asdict(config), "epochs_run": len(history), "best_epoch": best["epoch"],
                "history": history, "train_seconds": round(train_seconds, 1), "optimizer": "adam, cosine decay",
                "model": "trainer.encoder.build_encoder defaults"}
    data = {"dataset": "fashion-mnist", "train_split": "train", "test_split": "test",
            "train_items": int(len(train_idx)), "validation_items": int(len(val_idx)),
            "calibration_items": int(len(cal_idx)), "classes": int(n_classes),
            "calibration": "held-out slice of the train split (not trained on, not used for early stopping)"}
    card = export_encoder(model, out, training=training, data=data, metrics=metrics, thresholds=thresholds)

    summary = {
        "model_dir": out, "model_id": card["model_id"], "seed_auc": seed["auc"], "recall_at_1": recall[1],
        "recall_at_5": recall[5], "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1), "epochs_run": len(history),
        "best_epoch": best["epoch"], "validation_auc": best["auc"],
        "thresholds": {k: len(v) for k, v in thresholds.items()}, "plots": plots,
    }
    _log(config, f"test seed-protocol AUC {seed['auc']:.4f}  recall@1 {recall[1]:.4f}  -> {out} "
                 f"(model_id {card['model_id']}, {summary['total_seconds']:.0f}s in all)")
    return summary


# --- command line -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="siamese-dedup train",
        description="Train the Siamese/triplet image encoder on Fashion-MNIST and export the encoder artefact "
                    "(model.keras + model_card.json with test metrics and calibrated thresholds, plus roc.png "
                    "and similarity_hist.png) to --output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, help="artefact directory to write (created if missing)")
    parser.add_argument("--data_dir", default=None,
                        help="directory of the Fashion-MNIST IDX .gz files (default $FASHION_MNIST_DIR or "
                             "/usr/share/datasets/fashion-mnist)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="maximum number of epochs")
    parser.add_argument("--embedding_dim", type=int, default=d.embedding_dim, help="length of the embeddings")
    parser.add_argument("--loss", choices=("triplet", "contrastive"), default=d.loss, help="in-batch loss")
    parser.add_argument("--margin", type=float, default=d.margin,
                        help="triplet margin (contrastive: the negative margin), in units of --distance")
    parser.add_argument("--distance", choices=("cosine", "squared_euclidean"), default=d.distance,
                        help="distance inside the loss (cosine = 1 - cos)")
    parser.add_argument("--mining", choices=("all", "semihard", "hard"), default=d.mining,
                        help="triplet mining: batch-all positive triplets, FaceNet semi-hard, or batch-hard")
    parser.add_argument("--classes_per_batch", type=int, default=d.classes_per_batch, help="P of a P x K batch")
    parser.add_argument("--per_class", type=int, default=d.per_class, help="K of a P x K batch")
    parser.add_argument("--learning_rate", type=float, default=d.learning_rate, help="Adam peak learning rate")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of every random choice")
    parser.add_argument("--no_augment", dest="augment", action="store_false",
                        help="train on the original pixels only (no near-duplicate edits)")
    parser.add_argument("--augment_prob", type=float, default=d.augment_prob,
                        help="chance that a training view is edited by trainer.augment")
    parser.add_argument("--views", type=int, choices=(1, 2), default=d.views,
                        help="augmented views per image per batch; 2 adds an instance (near-duplicate) loss")
    parser.add_argument("--instance_weight", type=float, default=d.instance_weight,
                        help="weight of the instance (near-duplicate) triplet loss when --views 2")
    parser.add_argument("--instance_margin", type=float, default=d.instance_margin,
                        help="margin of the instance loss: an edited copy must be this much closer than "
                             "any other image, same class included")
    parser.add_argument("--validation_split", type=float, default=d.validation_split,
                        help="fraction of the train split held out for early stopping and calibration")
    parser.add_argument("--patience", type=int, default=d.patience,
                        help="stop after this many epochs without a better validation AUC")
    parser.add_argument("--max_train_items", type=int, default=None,
                        help="use only this many train-split images (quick tests)")
    parser.add_argument("--max_test_items", type=int, default=None,
                        help="evaluate on only the first this many test images (quick tests)")
    parser.add_argument("--quiet", dest="verbose", action="store_false", help="no per-epoch progress")
    return parser


def run(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point: parse flags, train, return the summary dict (also printed as JSON)."""
    args = build_parser().parse_args(argv)
    values = vars(args)
    config = TrainConfig(output_dir=values.pop("output"), **values)
    summary = train(config)
    if config.verbose:
        print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    try:
        run()
    except TrainingCollapsed as err:
        sys.exit(f"error: {err}")
