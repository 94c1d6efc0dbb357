"""Train the encoder with an in-batch triplet (or contrastive) loss and export the artefact.

    python -m trainer.train --output models/fmnist                  # or: siamese-dedup train --output ...
    python -m trainer.train --output models/q --preset quality      # the benchmark recipe (~15 min on 2 CPU cores)
    python -m trainer.train --output m --data folder --data_path photos/      # one subfolder per class
    python -m trainer.train --output m --data pairs --data_path tll/          # left/ + right/ same-named files
    python -m trainer.train --output m --data unlabelled --data_path catalogue/   # instance mode
    python -m trainer.train --output m --data npz --data_path arrays.npz      # images (+ labels)
    python -m trainer.train --output m --train_classes 0,1,2,3,4    # unseen-class protocol
    python -m trainer.train --output m --data unlabelled --data_path catalogue/ --preset catalogue \
        --hard_negatives reviewed.csv          # + pairs a person said are not copies, in every batch

Steps (train() runs them in order):
1. data and sampler (prepare_data, make_sampler): load the source and hold out a slice of it (validation
   for early stopping + a calibration set that never trains and never picks epochs; for sources other than
   Fashion-MNIST also a test slice); class-balanced P x K batches of augmented images (instance mode:
   batches of distinct images, each with an edited copy as its only positive);
2. the encoder and its loss (build_trainee, make_objective): trainer.losses' parts, as the flags assemble them;
3. the epochs (train_epochs): check for collapse each epoch, keep the best weights by the validation score;
4. evaluate and calibrate (export_tower, evaluate_test, calibrate): the test split (seed protocol AUC,
   recall@k, MAP@R, instance recall at target FMRs; with --train_classes also on the classes never trained
   on), thresholds on the calibration set ("class" and "instance");
5. export: the plots, model.keras + model_card.json.

Checkpoints: with --checkpoint_dir every epoch saves the weights, the optimizer state, the best weights so
far and the numpy random state; --resume DIR continues such a run at the next epoch (its stored config is
used, except --epochs / --output which may be given anew).
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
from typing import Callable, Iterator, Sequence

import numpy as np

from trainer import evaluate as ev
from trainer import hard_negatives as hn
from trainer.augment import augment_batch
from trainer.data import SOURCES, load_fashion_mnist, load_source
from siamese_core.similarity import SCORE_NORMS, all_pair_scores, angular_similarity, cosine_similarity
from trainer.samplers import InstanceSampler, PairedInstanceSampler, PKSampler

COLLAPSE_MEAN_COSINE = 0.98
STATE_FILE = "state.json"
PROXIES_FILE = "proxies.npy"

# Named recipes: flag defaults that a --preset switches to (flags given explicitly still win).
PRESETS = {
    # Class retrieval: three 'same'-padded conv stages with batch norm (28 -> 14 -> 7 -> 3, 0.4 M parameters)
    # and a wider head; the class triplet loss plus the normalized-softmax proxy loss (one view, no instance
    # term: it pushes same-class images apart) on 10 x 16 P x K batches, 10 epochs (~85 s each on the 2-core
    # reference machine; budget 15 min). Measured in BENCHMARKS.md "Trainer", with the recipes it beat
    # ('valid' padding, instance term, semi-hard mining, every view edited).
    "quality": {"filters": "32,64,128", "padding": "same", "batch_norm": True, "dense_units": 256, "epochs": 10,
                "patience": 3, "views": 1, "instance_weight": 0.0, "per_class": 16, "proxy_weight": 1.0},
    # Instance mode for near-duplicates: no class loss, every image its own identity, the edited copy its
    # only positive; a wider instance margin.
    "instance": {"instance_only": True, "filters": "32,64,128", "batch_norm": True, "dense_units": 256,
                 "epochs": 6, "patience": 2, "instance_margin": 0.3},
    # Copy detection on photos (trainer.copy_edits): 64 px RGB, four 'same' conv stages, InfoNCE over every
    # other image of a 2 x 128 batch plus the KoLeo spreading term. "catalogue" trains on the user's own
    # unlabelled catalogue, every image of it (nothing is split away: the match stage self-calibrates its
    # threshold on the catalogue); "copydetect" is the general recipe, trained on a photo corpus with a
    # held-out test split, for catalogues it has never seen. Measured in BENCHMARKS.md "Copy detection".
    "catalogue": {"instance_only": True, "edits": "copy", "instance_loss": "info_nce", "koleo_weight": 0.1,
                  "image_size": 64, "channels": 3, "filters": "32,64,128,256", "padding": "same",
                  "batch_norm": True, "pooling": "avg_max", "input_norm": "grey_standardize", "trim_borders": True,
                  "dense_units": 512, "embedding_dim": 128, "classes_per_batch": 8,
                  "per_class": 8, "epochs": 40, "epoch_items": 1536, "patience": 40, "keep_epoch": "last",
                  "test_fraction": 0.0,
                  "validation_split": 0.0, "learning_rate": 2e-3},
    "copydetect": {"data": "photo_corpus", "instance_only": True, "edits": "copy", "instance_loss": "info_nce",
                   "koleo_weight": 0.1, "image_size": 64, "channels": 3, "filters": "32,64,128,256",
                   "padding": "same", "batch_norm": True, "pooling": "avg_max", "input_norm": "grey_standardize",
                   "trim_borders": True, "dense_units": 512, "embedding_dim": 128, "classes_per_batch": 8,
                   "per_class": 8, "epochs": 60, "epoch_items": 1536, "patience": 60, "keep_epoch": "last",
                   "test_fraction": 0.1, "learning_rate": 2e-3, "score_norm": "knn"},
}
EDITS = ("near_duplicate", "copy")  # trainer.augment (Fashion-MNIST style) | trainer.copy_edits (photos)
# Which epoch is exported: the best by validation (early stopping), or the last (catalogue mode, where the
# "validation" images are trained on, so their score cannot pick an epoch).
KEEP_EPOCHS = ("best", "last")


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
    `augment_prob`. An epoch is len(train) (or `epoch_items`) embeddings of work (so with views=2 half the
    images, twice each).
    Instance mode (`--data unlabelled`, an npz without labels, or `instance_only`) drops the class loss and
    draws batches of P*K distinct images. With `proxy_weight` > 0 (labelled classes only) a normalized-softmax
    loss against one learnt proxy vector per class is added to the triplet loss; the proxies belong to the
    loss, not to the encoder, so they are never exported. With `ema_momentum` > 0 the optimizer keeps an
    exponential moving average of the weights, and that average is what each epoch validates and what is
    exported.
    With `hard_negatives` (instance mode only) the images of the pairs in that file (trainer.hard_negatives)
    join the training set, each its own identity, and every batch carries whole pairs of them (about a
    quarter of its images; trainer.samplers.PairedInstanceSampler), so the loss pushes each pair apart.
    """
    output_dir: str = "model"
    data: str = "fashion_mnist"
    data_path: str | None = None
    image_size: int | None = None     # other sources: side of the encoder input (default 64; npz: as stored)
    channels: int | None = None       # other sources: 1 or 3 (default 3; npz: as stored)
    test_fraction: float = 0.2        # other sources: held out as the test split
    embedding_dim: int = 64
    epochs: int = 3
    epoch_items: int | None = None   # embeddings of work per epoch (default: the training set's size)
    classes_per_batch: int = 10
    per_class: int = 8
    loss: str = "triplet"            # trainer.losses.BATCH_LOSSES
    margin: float = 0.4
    distance: str = "cosine"         # trainer.losses.DISTANCES
    mining: str = "all"              # trainer.losses.MINERS (the triplet loss's; contrastive takes every pair)
    learning_rate: float = 2e-3
    seed: int = 0
    augment: bool = True
    augment_prob: float = 0.5
    views: int = 2
    instance_weight: float = 1.0
    instance_margin: float = 0.15
    instance_only: bool = False
    proxy_weight: float = 0.0        # > 0: add the normalized-softmax loss on learnt class proxies
    proxy_temperature: float = 0.05
    ema_momentum: float = 0.0        # > 0: validate, keep and export a moving average of the weights
    edits: str = "near_duplicate"    # EDITS: which edits make the training copies
    mirror: bool = True              # copy edits: a left-right mirror counts as a copy
    trim_borders: bool = False       # other sources: decode cuts plain edge bands (siamese_core.decode)
    edit_source_size: int | None = None  # copy edits: side the copies are edited at (default 2 x image_size)
    instance_loss: str = "triplet"   # trainer.losses.INSTANCE_LOSSES: the instance (copy) loss
    temperature: float = 0.05        # info_nce: softmax temperature over cosines
    koleo_weight: float = 0.0        # > 0: add the KoLeo spreading term
    backbone: str = "small_cnn"
    weights: str | None = None
    freeze_until: str | None = None
    alpha: float = 1.0
    backbone_input_size: int | None = None
    filters: str = "32,64"
    convs_per_stage: int = 1
    padding: str = "valid"
    pooling: str = "flatten"         # small_cnn: trainer.encoder.POOLINGS
    input_norm: str = "none"         # small_cnn: trainer.encoder.INPUT_NORMS
    thumbnail: int = 0               # small_cnn: > 0 adds the parameter-free thumbnail branch of that side
    batch_norm: bool = False
    dense_units: int = 128
    dropout: float = 0.1
    train_classes: str | None = None  # "0,1,2,3,4": train on these classes, report the others as unseen
    hard_negatives: str | None = None  # a file of pairs that are NOT copies (trainer.hard_negatives.FORMAT_HELP)
    validation_split: float = 0.1    # of the train split: held out for validation + calibration
    validation_items: int = 2000     # the part of the held-out slice used for early stopping
    calibration_items: int = 3000    # the part used to calibrate thresholds (all pairs: ~4.5 M)
    instance_test_items: int = 3000  # test images for the instance protocol on the test split
    patience: int = 2
    keep_epoch: str = "best"         # KEEP_EPOCHS: export the best validated epoch, or the last one
    max_train_items: int | None = None
    max_test_items: int | None = None
    data_dir: str | None = None
    checkpoint_dir: str | None = None
    tensorboard_dir: str | None = None
    mixed_precision: str = "auto"    # MIXED_PRECISION: "auto" (on when a GPU is present) | "on" | "off"
    deterministic: bool = True       # one TF op at a time (pin_op_threads): the same seed gives the same model
    preset: str | None = None
    # How match scores this model's pairs when its --score_norm is not given (siamese_core.similarity.knn_normalised):
    # "knn" for the general recipe, whose catalogues are unseen, so their dense regions crowd distinct pairs up.
    score_norm: str = "none"
    stop_after_epoch: int | None = None  # end the run after this epoch (as if interrupted; for --resume tests)
    verbose: bool = True


def _log(config: TrainConfig, message: str) -> None:
    if config.verbose:
        print(message, file=sys.stderr, flush=True)


def _int_list(text: str | None) -> list[int] | None:
    return None if text in (None, "") else [int(v) for v in str(text).split(",") if v.strip() != ""]


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


def split_groups(labels: np.ndarray, fraction: float, rng: np.random.Generator,
                 minimum: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held) with whole label groups held out (pairs stay together, an instance-mode image
    is its own group): about `fraction` of the groups, at least `minimum` groups."""
    groups = np.unique(labels)
    n_held = min(len(groups) - minimum, max(minimum, int(round(len(groups) * fraction))))
    if n_held < minimum:
        raise ValueError(f"{len(groups)} groups are too few to hold out {minimum} and keep {minimum}")
    held_groups = rng.permutation(groups)[:n_held]
    held = np.isin(labels, held_groups)
    return np.flatnonzero(~held), np.flatnonzero(held)


def _stratified_cut(labels: np.ndarray, fraction: float, rng: np.random.Generator):
    """(kept, held) indices with about `fraction` of each class held out."""
    held = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        held.append(members[:int(round(len(members) * fraction))])
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


def make_edit(config: TrainConfig, input_spec: dict) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The training edits of `config.edits`: (sources uint8 (n, S, S, C), rng) -> copies uint8 of the input
    spec's shape (n, H, W, C). near_duplicate edits the input-size images themselves (trainer.augment); copy
    edits photos at `edit_source_size` and resizes to the input like decode (trainer.copy_edits)."""
    if _copy_side(config, input_spec) is None:
        return augment_batch
    from trainer.copy_edits import BatchAugmenter
    return BatchAugmenter(_copy_side(config, input_spec), mirror=config.mirror, trim=config.trim_borders)


def _copy_side(config: TrainConfig, input_spec: dict) -> int | None:
    """The input side copy edits resize to (None for near_duplicate edits); refuses what they cannot edit."""
    if config.edits not in EDITS:
        raise ValueError(f"edits must be one of {EDITS}, got {config.edits!r}")
    if config.edits == "near_duplicate":
        return None
    h, w, c = int(input_spec["height"]), int(input_spec["width"]), int(input_spec["channels"])
    if h != w or c != 3:
        raise ValueError(f"copy edits need square RGB input (--channels 3); the input spec is {h}x{w}x{c}")
    return h


def make_eval_copies(config: TrainConfig, input_spec: dict) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The copies validation, calibration and the test protocol judge: near_duplicate as in training; copy
    edits one planted family per image (trainer.copy_edits.PlantedBatch), as the demo catalogue plants them,
    not the heavier random compositions training uses."""
    side = _copy_side(config, input_spec)
    if side is None:
        return make_edit(config, input_spec)
    from trainer.copy_edits import PlantedBatch
    return PlantedBatch(side, mirror=config.mirror, trim=config.trim_borders)


def edit_source_spec(config: TrainConfig, input_spec: dict) -> dict | None:
    """The decode spec of the images copies are edited from (copy edits only: larger than the input, so a
    crop or a caption is made at photo resolution and then resized, as a real copy is)."""
    if config.edits != "copy":
        return None
    side = int(config.edit_source_size or 2 * int(input_spec["height"]))
    return {**input_spec, "height": side, "width": side}


VIEWS = (1, 2)  # --views: each image once, or beside an edited copy of itself (the instance loss's positive)


def _batches(images: np.ndarray, labels: np.ndarray, sampler, rng: np.random.Generator,
             config: TrainConfig, edit: Callable[[np.ndarray, np.random.Generator], np.ndarray],
             sources: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(pixels float32 (B, H, W, C), class labels (B,), instance ids (B,)) for one epoch; B = views*P*K.
    `edit(sources[rows], rng)` makes the edited views (`sources` is `images` itself for near_duplicate)."""
    for idx in sampler.epoch(rng):
        b = len(idx)
        idx = np.tile(idx, config.views)
        x = images[idx]
        if config.augment:
            # The first view is edited with probability augment_prob; further views always are, so each
            # image is paired with a real near-duplicate of itself (never a pixel-identical twin).
            edited = rng.random(len(idx)) < config.augment_prob
            edited[b:] = True
            edited = np.flatnonzero(edited)
            if len(edited):
                x[edited] = edit(sources[idx[edited]], rng).reshape((len(edited),) + x.shape[1:])
        if x.ndim == 3:
            x = x[..., None]
        yield x.astype(np.float32), labels[idx], idx


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

def pin_op_threads(deterministic: bool) -> bool:
    """Whether this process trains deterministically: with `deterministic`, TensorFlow runs one op at a time
    (each op still uses every core). Why: with ops side by side, the weight gradient of the photo encoder's
    first convolution came out different by 1e-8 in some steps (thread timing decides; one op per thread did
    not help, one op at a time did), so two runs of one seed drifted apart and ended as different models.
    The price, measured on the 2-core reference machine: about 1.05x the epoch time.
    TensorFlow fixes its thread pools when it starts: in a process where it has already started with ops
    side by side, this returns False (the card then says the run was not deterministic)."""
    import tensorflow as tf
    if not deterministic:
        return False
    if tf.config.threading.get_inter_op_parallelism_threads() == 1:
        return True
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # "Inter op parallelism cannot be modified after initialization"
        return False
    return True


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
    margin = config.instance_margin if config.instance_only else config.margin
    if config.loss == "triplet" and abs(loss - margin) < 0.01 * margin:
        raise TrainingCollapsed(
            f"epoch {epoch}: the triplet loss is stuck at the margin ({loss:.4f} ~ {margin}): "
            f"positives and negatives are equally far apart, nothing is being learnt. Try a lower "
            f"--learning_rate or --mining all.")
    return mean_cos


def encoder_kwargs(config: TrainConfig) -> dict:
    """build_encoder keyword arguments of a config (also recorded in the model card)."""
    return {"embedding_dim": config.embedding_dim, "filters": tuple(_int_list(config.filters)),
            "dense_units": config.dense_units, "dropout": config.dropout, "batch_norm": config.batch_norm,
            "padding": config.padding, "pooling": config.pooling, "input_norm": config.input_norm,
            "thumbnail": config.thumbnail, "convs_per_stage": config.convs_per_stage, "backbone": config.backbone,
            "weights": config.weights, "freeze_until": config.freeze_until, "alpha": config.alpha,
            "backbone_input_size": config.backbone_input_size}


def initial_proxies(config: TrainConfig, n_classes: int) -> np.ndarray:
    """The proxy loss's starting class vectors, float32 (n_classes, embedding_dim): random directions of
    about unit length, seeded (part of what decides the model)."""
    rng = np.random.default_rng(config.seed + 3)
    return rng.standard_normal((n_classes, config.embedding_dim)).astype(np.float32) / math.sqrt(
        config.embedding_dim)


def make_optimizer(config: TrainConfig, total_steps: int):
    """Adam whose learning rate decays along a cosine over `total_steps` to 5% of its peak; it keeps a
    moving average of the weights when --ema_momentum > 0. (bench/bench_train_jax.py uses it too.)"""
    import keras
    schedule = keras.optimizers.schedules.CosineDecay(config.learning_rate, decay_steps=max(1, total_steps),
                                                      alpha=0.05)
    return keras.optimizers.Adam(schedule, use_ema=config.ema_momentum > 0,
                                 ema_momentum=config.ema_momentum or 0.99)


CHANNELS = (1, 3)  # --channels of the sources other than Fashion-MNIST and npz: grey or RGB


def _input_spec(config: TrainConfig, images: np.ndarray | None = None) -> dict:
    from trainer.encoder import DEFAULT_INPUT_SPEC
    if config.data == "fashion_mnist":
        return dict(DEFAULT_INPUT_SPEC)
    if config.data == "npz" and images is not None and config.image_size is None and config.channels is None:
        return {"height": int(images.shape[1]), "width": int(images.shape[2]),
                "channels": int(images.shape[3]) if images.ndim == 4 else 1, "dtype": "uint8",
                "value_range": [0, 255]}
    side = int(config.image_size or 64)
    spec = {"height": side, "width": side, "channels": int(config.channels or 3), "dtype": "uint8",
            "value_range": [0, 255]}
    return {**spec, "trim_borders": True} if config.trim_borders else spec


def _fashion_mnist_splits(config: TrainConfig) -> dict:
    """Fashion-MNIST's train split as the pool and its test split as the test split, class-labelled."""
    images, labels = load_fashion_mnist("train", config.data_dir or config.data_path)
    test_images, test_labels = load_fashion_mnist("test", config.data_dir or config.data_path)
    return {"images": images, "labels": labels, "sources": None, "test_images": test_images,
            "test_labels": test_labels, "test_sources": None, "kind": "class",
            "description": {"dataset": "fashion-mnist", "train_split": "train", "test_split": "test"}}


def _source_splits(config: TrainConfig) -> dict:
    """Another source (trainer.data.load_source) cut into the pool and a test split: a held-out
    `test_fraction` (whole pairs / images, a share of every class), or with test_fraction 0 a sample of the
    pool itself. With copy edits `sources` / `test_sources` are the same images decoded at
    edit_source_size (else None)."""
    spec = None if config.data == "npz" and config.image_size is None and config.channels is None \
        else _input_spec(config)
    source = load_source(config.data, config.data_path, spec)
    images, labels, kind = source.images, source.labels, source.kind
    source_spec = edit_source_spec(config, spec) if spec else None
    sources = load_source(config.data, config.data_path, source_spec).images if source_spec else None
    cut_rng = np.random.default_rng(config.seed + 1)
    if config.test_fraction == 0:
        # Catalogue mode: every image trains (a catalogue being deduplicated is not split into test
        # sets); the test figures are then on a sample of the trained images, and say so.
        keep = np.arange(len(labels))
        held = np.sort(cut_rng.permutation(len(labels))[:config.instance_test_items])
        test_split = f"{len(held)} of the training images themselves (nothing held out: catalogue mode)"
    else:
        # The test split is a held-out slice of the source: whole pairs / images, a share of every class.
        keep, held = (_stratified_cut(labels, config.test_fraction, cut_rng) if kind == "class"
                      else split_groups(labels, config.test_fraction, cut_rng))
        test_split = f"held-out {config.test_fraction:g} of the source (seed {config.seed})"
    return {"images": images[keep], "labels": labels[keep], "sources": None if sources is None else sources[keep],
            "test_images": images[held], "test_labels": labels[held],
            "test_sources": None if sources is None else sources[held], "kind": kind,
            "description": {"dataset": config.data, "path": config.data_path, "kind": kind,
                            "train_split": f"{1 - config.test_fraction:g} of the source", "test_split": test_split}}


def _load(config: TrainConfig, rng: np.random.Generator) -> dict:
    """The train pool and the test split of the configured source, as numpy arrays + their meaning; with
    copy edits also `sources` / `test_sources`, the same images decoded at edit_source_size (else the
    images themselves). Instance mode numbers every image as its own identity; --max_train_items and
    --max_test_items cap the two."""
    split = _fashion_mnist_splits(config) if config.data == "fashion_mnist" else _source_splits(config)
    images, labels, sources = split["images"], split["labels"], split["sources"]
    test_images, test_labels, test_sources = split["test_images"], split["test_labels"], split["test_sources"]
    kind = "instance" if config.instance_only else split["kind"]
    if kind == "instance":
        labels = np.arange(len(labels), dtype=np.int64)
        test_labels = np.arange(len(test_labels), dtype=np.int64)
    if config.max_train_items:
        keep = np.sort(rng.permutation(len(labels))[:config.max_train_items])
        images, labels = images[keep], labels[keep]
        sources = sources[keep] if sources is not None else None
    if config.max_test_items:
        test_images, test_labels = test_images[:config.max_test_items], test_labels[:config.max_test_items]
        test_sources = test_sources[:config.max_test_items] if test_sources is not None else None
    return {"images": images, "labels": labels, "test_images": test_images, "test_labels": test_labels,
            "kind": kind, "description": split["description"],
            "sources": images if sources is None else sources,
            "test_sources": test_images if test_sources is None else test_sources}


def _check_hard_negatives_mode(config: TrainConfig, kind: str) -> None:
    """--hard_negatives needs instance mode (see _add_hard_negatives); checked as soon as the mode is known."""
    if config.hard_negatives and kind != "instance":
        raise ValueError(f"--hard_negatives needs instance mode (--data unlabelled or photo_corpus, an npz "
                         f"without labels, --instance_only, or the catalogue / copydetect / instance presets); "
                         f"the {config.data} source is in {kind} mode")


def _add_hard_negatives(config: TrainConfig, kind: str, table: hn.PairTable, input_spec: dict,
                        train: tuple[np.ndarray, np.ndarray, np.ndarray], next_label: int):
    """The training arrays (images, labels, edit sources) with the hard-negative pairs' images added, the
    pairs as int64 (p, 2) indices into them, and the card's record of the file.

    Instance mode only: there each image is its own identity, so a pair's two images are two identities
    the in-batch loss pushes apart. In class mode two images of a pair would need classes of their own,
    of one image each, beside classes of hundreds: refused rather than half supported. An image equal to a
    training image is that item (hard_negatives.place_in); a new one gets a new label from `next_label` on
    (past every label of the pool, so it never meets a validation or calibration identity's)."""
    _check_hard_negatives_mode(config, kind)  # train() checked before the split; kept for other callers
    images, labels, sources = train
    hard = hn.load_hard_negatives(table, input_spec, edit_source_spec(config, input_spec))
    new, pairs = hn.place_in(images, hard)
    added = hard.images[new].reshape((len(new),) + images.shape[1:])
    added_sources = (added if hard.sources is None else hard.sources[new]).reshape((len(new),) + sources.shape[1:])
    record = {**hard.record, "new_items": int(len(new))}
    return (np.concatenate([images, added]), np.concatenate([labels, next_label + np.arange(len(new))]),
            np.concatenate([sources, added_sources]), pairs, record)


def _held_out(labels: np.ndarray, kind: str, config: TrainConfig):
    """(train, validation, calibration) indices of the train pool."""
    if kind == "class":
        return split_train(labels, config)
    rng = np.random.default_rng(config.seed)
    if config.validation_split == 0:
        # Catalogue mode: nothing is held out; early stopping and the card's calibration look at samples of
        # the training images (the match stage calibrates on the catalogue itself anyway).
        order = rng.permutation(len(labels))
        n_val = min(config.validation_items, len(labels) // 2)
        return (np.arange(len(labels)), np.sort(order[:n_val]),
                np.sort(order[n_val:n_val + config.calibration_items]))
    keep, held = split_groups(labels, config.validation_split, rng, minimum=4)
    held = rng.permutation(held) if kind == "instance" else held
    groups = np.unique(labels[held])
    val_groups = groups[:len(groups) // 2]
    is_val = np.isin(labels[held], val_groups)
    val, cal = np.sort(held[is_val]), np.sort(held[~is_val])
    return keep, val[:config.validation_items], cal[:config.calibration_items]


def _validation_score(kind: str, emb: np.ndarray, labels: np.ndarray, copies_emb: np.ndarray | None,
                      seed: int) -> float:
    """What early stopping maximises: seed-protocol AUC, or in instance mode the true match rate of edited
    copies at FMR 1e-3 among the validation images (plus their AUC as a tie-breaker)."""
    if kind != "instance":
        return ev.seed_protocol(emb, labels, seed=seed)["auc"]
    genuine = angular_similarity(cosine_similarity(emb, copies_emb))
    _, impostor = all_pair_scores(emb, None)
    cut = np.quantile(impostor, 1 - 1e-3)
    return float(np.mean(genuine > cut)) + 1e-3 * ev.rank_auc(genuine, impostor)


def _save_checkpoint(directory: str, model, proxies, optimizer, best: dict, state: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    model.save_weights(os.path.join(directory, "last.weights.h5"))
    if proxies is not None:  # the proxy loss's class vectors: trained, so part of the state to resume
        np.save(os.path.join(directory, PROXIES_FILE), proxies.numpy())
    np.savez(os.path.join(directory, "optimizer.npz"),
             *[np.asarray(v.numpy()) for v in optimizer.variables])
    if best["weights"] is not None:
        np.savez(os.path.join(directory, "best.npz"), *best["weights"])
    tmp = os.path.join(directory, STATE_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, default=ev_json)
    os.replace(tmp, os.path.join(directory, STATE_FILE))  # the state file last: it marks a complete epoch


def ev_json(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


def _load_npz_list(path: str) -> list[np.ndarray]:
    with np.load(path) as z:
        return [z[f"arr_{i}"] for i in range(len(z.files))]


# --- the recipe: train() runs these steps in order ---------------------------------------------------------

MIXED_PRECISION = ("auto", "on", "off")  # --mixed_precision: float16 compute with float32 weights


def start_runtime(config: TrainConfig) -> tuple[bool, bool]:
    """Set TensorFlow up for the run: one op at a time (pin_op_threads), the seed, the float16/float32
    policy. Returns (deterministic, mixed precision)."""
    import keras
    import tensorflow as tf
    deterministic = pin_op_threads(config.deterministic)
    if config.deterministic and not deterministic:
        _log(config, "warning: TensorFlow started in this process before training, running ops side by side: "
                     "this run is not bit-reproducible (train in a fresh process, or --no-deterministic)")
    keras.utils.set_random_seed(config.seed)
    mixed = (config.mixed_precision == "on"
             or (config.mixed_precision == "auto" and bool(tf.config.list_physical_devices("GPU"))))
    # float16 compute, float32 variables; the exported tower is rebuilt in float32 (export_tower). Set either
    # way, so a run that failed half-way in this process leaves no policy behind for the next.
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    return deterministic, mixed


@dataclasses.dataclass
class TrainingData:
    """What a run trains, validates, calibrates and tests on (prepare_data).

    loaded: _load's dict (the pool's images, labels, sources; the test split; the description).
    kind: "class" | "pair" | "instance". train_idx, val_idx, cal_idx: int indices into the pool.
    x_train, y_train, src_train: the training images, labels and copy-edit sources, with the hard-negative
      pairs' images appended (hard_pairs int64 (p, 2) indices into them, hard_record the card's record).
    """
    loaded: dict
    kind: str
    seen_classes: list[int] | None
    train_idx: np.ndarray
    val_idx: np.ndarray
    cal_idx: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    src_train: np.ndarray
    input_spec: dict
    hard_pairs: np.ndarray | None
    hard_record: dict | None

    @property
    def instance_mode(self) -> bool:
        return self.kind == "instance"


def prepare_data(config: TrainConfig, rng: np.random.Generator) -> TrainingData:
    """Step 1: load the source, hold out validation and calibration, keep the --train_classes, add the
    --hard_negatives pairs."""
    # The file's columns are checked before the (long) load; its images are decoded once the spec is known.
    hard_table = hn.read_pair_table(config.hard_negatives) if config.hard_negatives else None
    loaded = _load(config, rng)
    images, labels, kind = loaded["images"], loaded["labels"], loaded["kind"]
    _check_hard_negatives_mode(config, kind)
    seen_classes = _int_list(config.train_classes)
    train_idx, val_idx, cal_idx = _held_out(labels, kind, config)
    if seen_classes is not None:
        if kind != "class":
            raise ValueError("--train_classes needs a labelled source (fashion_mnist, folder, npz with labels)")
        seen = np.isin(labels, seen_classes)
        train_idx, val_idx, cal_idx = (i[seen[i]] for i in (train_idx, val_idx, cal_idx))
    x_train, y_train = images[train_idx], labels[train_idx]
    src_train = loaded["sources"][train_idx]
    input_spec = _input_spec(config, images)
    hard_pairs, hard_record = None, None
    if hard_table is not None:
        x_train, y_train, src_train, hard_pairs, hard_record = _add_hard_negatives(
            config, kind, hard_table, input_spec, (x_train, y_train, src_train), int(labels.max()) + 1)
        _log(config, f"hard negatives: {hard_record['pairs_used']} of {hard_record['pairs_given']} pairs used "
                     f"({hard_record['new_items']} images new to the training set), skipped "
                     f"{hard_record['skipped'] or 'none'}")
    return TrainingData(loaded, kind, seen_classes, train_idx, val_idx, cal_idx, x_train, y_train, src_train,
                        input_spec, hard_pairs, hard_record)


def make_sampler(config: TrainConfig, data: TrainingData, views: int):
    """Step 1 (cont.): the batch sampler of the mode, and its batch shape in words. Instance mode: batches
    of P*K distinct images (with --hard_negatives: carrying whole pairs); else P x K class-balanced batches
    (K = 2 for pairs). An epoch is `epoch_items` (default: the training set's size) embeddings of work."""
    y_train = data.y_train
    if data.instance_mode:
        batch = config.classes_per_batch * config.per_class
        sampler = InstanceSampler(len(y_train), min(batch, len(y_train)),
                                  max(1, (config.epoch_items or len(y_train)) // (views * batch)))
        shape = f"{views} x {sampler.batch_size} images"
        if data.hard_pairs is not None:  # a separate sampler: without the flag batches stay exactly as they were
            sampler = PairedInstanceSampler(len(y_train), sampler.batch_size, data.hard_pairs, len(sampler))
            shape += f" ({2 * sampler.pairs_per_batch} of them from {len(data.hard_pairs)} hard-negative pairs)"
        return sampler, shape
    p = min(config.classes_per_batch, len(np.unique(y_train)))
    k = 2 if data.kind == "pair" else config.per_class
    sampler = PKSampler(y_train, p=p, k=k,
                        batches_per_epoch=max(1, (config.epoch_items or len(y_train)) // (views * p * k)))
    return sampler, f"{views} x {p} x {k}"


def make_objective(config: TrainConfig, data: TrainingData, views: int, proxies=None):
    """Step 2: the training loss, assembled from trainer.losses. Returns objective(y (B,), ids (B,),
    emb float32 (B, D)) -> (main loss, total loss), scalars; the main loss is what the collapse check reads
    (the class loss, or in instance mode the instance loss).

    Class mode: the class loss (--loss with its --mining on --distance, --margin), plus with views > 1 the
    instance loss weighted by --instance_weight, plus with `proxies` (a tf.Variable (C, D)) the
    normalized-softmax loss weighted by --proxy_weight. Instance mode: the instance loss (--instance_loss),
    plus --koleo_weight times the KoLeo term.
    """
    import tensorflow as tf

    from trainer.losses import koleo_loss, make_batch_loss, make_instance_loss, normalized_softmax_loss
    instance_mode = data.instance_mode
    # The contrastive loss takes every pair of the batch: --mining has always been the triplet loss's.
    class_loss = make_batch_loss(config.loss, mining=config.mining if config.loss == "triplet" else "all",
                                 distance=config.distance, margin=config.margin)
    instance_loss = make_instance_loss(config.instance_loss, distance=config.distance,
                                       margin=config.instance_margin, temperature=config.temperature)
    use_instances = views > 1 and (config.instance_weight > 0 or instance_mode)
    inst_weight = 1.0 if instance_mode else config.instance_weight
    proxy_classes = tf.constant(np.unique(data.y_train)) if proxies is not None else None

    def objective(y, ids, emb):
        if instance_mode:
            loss = instance_loss(ids, emb)
            total = loss + config.koleo_weight * koleo_loss(emb, ids) if config.koleo_weight > 0 else loss
        else:
            loss = class_loss(y, emb)
            total = loss + inst_weight * instance_loss(ids, emb) if use_instances else loss
            if proxies is not None:
                index = tf.searchsorted(proxy_classes, tf.cast(y, proxy_classes.dtype))
                total += config.proxy_weight * normalized_softmax_loss(emb, index, proxies,
                                                                       config.proxy_temperature)
        return loss, total
    return objective


def make_proxies(config: TrainConfig, data: TrainingData):
    """The proxy loss's class vectors, a tf.Variable (C, D), or None without --proxy_weight (class mode only)."""
    import tensorflow as tf
    if config.proxy_weight <= 0:
        return None
    if data.kind != "class":
        raise ValueError(f"--proxy_weight needs class labels; the {config.data!r} source is in {data.kind} mode")
    return tf.Variable(initial_proxies(config, len(np.unique(data.y_train))), name="class_proxies")


def embedder(model) -> Callable[[np.ndarray], np.ndarray]:
    """embed(images (n, H, W[, C])) -> float32 (n, D) embeddings by `model`, through a compiled inference
    call: about twice as fast as calling the model eagerly batch by batch."""
    import tensorflow as tf
    predict = tf.function(lambda batch: tf.cast(model(batch, training=False), tf.float32),
                          reduce_retracing=True, autograph=False)
    return lambda x: ev.embed_images(model, x, predict_fn=predict)


@dataclasses.dataclass
class Trainee:
    """The encoder being trained and what trains it (build_trainee). optimizer is `adam`, wrapped in a
    loss scale under mixed precision; trainables are the model's plus the proxies (None without them)."""
    model: object
    adam: object
    optimizer: object
    proxies: object
    trainables: list
    train_step: Callable
    embed: Callable[[np.ndarray], np.ndarray]


def build_trainee(config: TrainConfig, data: TrainingData, views: int, total_steps: int, mixed: bool) -> Trainee:
    """Step 2 (cont.): the encoder, the optimizer and the compiled training step of the objective."""
    import keras
    import tensorflow as tf

    from trainer.encoder import build_encoder
    model = build_encoder(data.input_spec, **encoder_kwargs(config))
    adam = make_optimizer(config, total_steps)
    optimizer = keras.optimizers.LossScaleOptimizer(adam) if mixed else adam
    proxies = make_proxies(config, data)
    objective = make_objective(config, data, views, proxies)
    trainables = model.trainable_variables + ([proxies] if proxies is not None else [])

    @tf.function(reduce_retracing=True, autograph=False)  # no tensor-dependent Python control flow
    def train_step(x, y, ids):
        with tf.GradientTape() as tape:
            emb = tf.cast(model(x, training=True), tf.float32)
            loss, total = objective(y, ids, emb)
            scaled = optimizer.scale_loss(total) if mixed else total
        grads = tape.gradient(scaled, trainables)
        optimizer.apply_gradients(zip(grads, trainables))
        return loss, total

    return Trainee(model, adam, optimizer, proxies, trainables, train_step, embedder(model))


def _restore(config: TrainConfig, trainee: Trainee, resume_state: dict, rng: np.random.Generator):
    """Load a --resume checkpoint into the trainee and rng; returns (history, best, first epoch)."""
    ckpt = config.checkpoint_dir
    trainee.model.load_weights(os.path.join(ckpt, "last.weights.h5"))
    if trainee.proxies is not None:
        trainee.proxies.assign(np.load(os.path.join(ckpt, PROXIES_FILE)))
    optimizer = trainee.optimizer
    optimizer.build(trainee.trainables)
    saved = _load_npz_list(os.path.join(ckpt, "optimizer.npz"))
    if len(saved) != len(optimizer.variables):
        raise ValueError(f"{ckpt}: optimizer state has {len(saved)} arrays, the optimizer {len(optimizer.variables)}")
    for var, value in zip(optimizer.variables, saved):
        var.assign(value)
    best = {"auc": resume_state["best_auc"], "epoch": resume_state["best_epoch"],
            "weights": _load_npz_list(os.path.join(ckpt, "best.npz"))}
    rng.bit_generator.state = resume_state["rng_state"]
    _log(config, f"resumed from {ckpt} after epoch {resume_state['epoch']} (best so far: epoch "
                 f"{best['epoch']}, validation {best['auc']:.4f})")
    return resume_state["history"], best, resume_state["epoch"] + 1


def _train_epoch(config: TrainConfig, epoch: int, batches: Iterator, trainee: Trainee, steps_per_epoch: int,
                 writer) -> tuple[list[float], list[float]]:
    """One epoch of training steps; returns every step's (main, total) loss."""
    import tensorflow as tf
    t_epoch = time.perf_counter()
    losses, totals = [], []
    report_every = max(1, steps_per_epoch // 5)
    for step, (x, y, ids) in enumerate(_prefetch(batches), 1):
        loss, total = trainee.train_step(x, y, ids)
        losses.append(float(loss))
        totals.append(float(total))
        if not math.isfinite(totals[-1]):
            raise TrainingCollapsed(f"epoch {epoch}: loss became {totals[-1]}; try a lower --learning_rate")
        if step % report_every == 0 and step < steps_per_epoch:
            rate = step * len(x) / (time.perf_counter() - t_epoch)
            _log(config, f"  epoch {epoch} step {step}/{steps_per_epoch}: loss {np.mean(totals[-report_every:]):.4f}"
                         f"  {rate:.0f} images/s")
        if writer is not None and step % 20 == 0:
            with writer.as_default():
                tf.summary.scalar("loss/total", totals[-1], step=(epoch - 1) * steps_per_epoch + step)
                tf.summary.scalar("loss/main", losses[-1], step=(epoch - 1) * steps_per_epoch + step)
    return losses, totals


def train_epochs(config: TrainConfig, data: TrainingData, trainee: Trainee, sampler, views: int, edit: Callable,
                 eval_copies: Callable, rng: np.random.Generator,
                 resume_state: dict | None) -> tuple[list[dict], dict, float]:
    """Step 3: the epoch loop. Each epoch trains on the sampler's batches, checks for collapse, scores the
    validation images and keeps the best weights (or the last, --keep_epoch last); it stops after
    --patience epochs without a better score, and checkpoints with --checkpoint_dir. `edit` makes the
    training copies (make_edit), `eval_copies` the validation copies (make_eval_copies). Returns (history,
    best {"auc", "epoch", "weights"}, training seconds, those of resumed epochs included)."""
    import keras
    import tensorflow as tf
    images, labels, sources = data.loaded["images"], data.loaded["labels"], data.loaded["sources"]
    instance_mode, val_idx, model = data.instance_mode, data.val_idx, trainee.model
    cfg_views = dataclasses.replace(config, views=views)
    steps_per_epoch = len(sampler)
    val_copies = eval_copies(sources[val_idx], np.random.default_rng(config.seed + 7)) if instance_mode else None
    history, best, first_epoch = [], {"auc": -1.0, "epoch": 0, "weights": None}, 1
    if resume_state is not None:
        history, best, first_epoch = _restore(config, trainee, resume_state, rng)
    writer = tf.summary.create_file_writer(config.tensorboard_dir) if config.tensorboard_dir else None

    t_train = time.perf_counter()
    stopped_early = bool(resume_state and resume_state.get("stopped_early"))
    for epoch in range(first_epoch, config.epochs + 1):
        if stopped_early:
            break
        # Per-epoch TF seed (dropout etc.): a resumed run draws what the uninterrupted run would have.
        keras.utils.set_random_seed(config.seed * 1000 + epoch)
        for var in model.non_trainable_variables:  # dropout's seed state is not in the saved weights
            if var.path.endswith("seed_generator_state"):
                var.assign(np.array([config.seed * 1000 + epoch, 0], dtype=var.dtype))
        t_epoch = time.perf_counter()
        batches = _batches(data.x_train, data.y_train, sampler, rng, cfg_views, edit, data.src_train)
        losses, totals = _train_epoch(config, epoch, batches, trainee, steps_per_epoch, writer)
        epoch_loss = float(np.mean(totals))
        if config.ema_momentum > 0:  # judge (and keep) the averaged weights; training goes on from the raw ones
            raw = [v.numpy() for v in trainee.trainables]
            trainee.adam.finalize_variable_values(trainee.trainables)
        val_emb = trainee.embed(images[val_idx])
        # The margin test looks at the class loss alone (the instance term has its own margin).
        mean_cos = _check_collapse(config, epoch, float(np.mean(losses)), val_emb)
        val_auc = _validation_score(data.kind, val_emb, labels[val_idx],
                                    trainee.embed(val_copies) if instance_mode else None, config.seed)
        seconds = time.perf_counter() - t_epoch
        history.append({"epoch": epoch, "loss": round(epoch_loss, 5), "val_auc": round(val_auc, 5),
                        "mean_pairwise_cosine": round(mean_cos, 4), "seconds": round(seconds, 1)})
        _log(config, f"epoch {epoch}/{config.epochs}: loss {epoch_loss:.4f}  validation "
                     f"{'TMR@1e-3' if instance_mode else 'AUC'} {val_auc:.4f}  mean cos {mean_cos:.3f}  {seconds:.0f}s")
        if writer is not None:
            with writer.as_default():
                tf.summary.scalar("validation/score", val_auc, step=epoch)
                tf.summary.scalar("validation/mean_pairwise_cosine", mean_cos, step=epoch)
                tf.summary.scalar("loss/epoch", epoch_loss, step=epoch)
            writer.flush()
        if val_auc > best["auc"] or config.keep_epoch == "last":
            best = {"auc": val_auc, "epoch": epoch, "weights": [w.copy() for w in model.get_weights()]}
        elif epoch - best["epoch"] >= config.patience:
            _log(config, f"early stop: no better validation score for {config.patience} epochs")
            stopped_early = True
        if config.ema_momentum > 0:
            for var, value in zip(trainee.trainables, raw):
                var.assign(value)
        if config.checkpoint_dir:
            _save_checkpoint(config.checkpoint_dir, model, trainee.proxies, trainee.optimizer, best, {
                "epoch": epoch, "history": history, "best_auc": best["auc"], "best_epoch": best["epoch"],
                "rng_state": rng.bit_generator.state, "stopped_early": stopped_early,
                "config": dataclasses.asdict(config)})
        if config.stop_after_epoch and epoch >= config.stop_after_epoch and epoch < config.epochs:
            _log(config, f"stopping after epoch {epoch} as asked (--stop_after_epoch); resume with --resume")
            break
    train_seconds = time.perf_counter() - t_train + sum(
        h["seconds"] for h in history[:max(0, first_epoch - 1)])
    return history, best, train_seconds


def export_tower(config: TrainConfig, data: TrainingData, trainee: Trainee, best: dict, mixed: bool):
    """Step 4: the kept epoch's weights in a float32 encoder (the artefact's contract, and fast on CPU
    workers; under mixed precision the tower is rebuilt). Returns (model, embed)."""
    import keras

    from trainer.encoder import build_encoder
    model = trainee.model
    model.set_weights(best["weights"])
    if not mixed:
        return model, trainee.embed
    keras.mixed_precision.set_global_policy("float32")
    plain = build_encoder(data.input_spec, **encoder_kwargs(config))
    plain.set_weights(model.get_weights())
    return plain, embedder(plain)


def evaluate_test(config: TrainConfig, data: TrainingData, embed: Callable, eval_copies: Callable) -> dict:
    """Step 5: scores on the test split. Labelled: seed protocol AUC, recall@k, MAP@R (with --train_classes
    also on the seen and unseen classes); always the instance protocol, edited copies of test images against
    every other test image, the copies made by `eval_copies` (make_eval_copies). Returns {"metrics",
    "curves" {name: (genuine, impostor)}, "instance" (the protocol's result), "example_rows", "items"}."""
    loaded, seen_classes = data.loaded, data.seen_classes
    test_images, test_labels = loaded["test_images"], loaded["test_labels"]
    test_emb = embed(test_images)
    metrics, curves, example_rows = {}, {}, []
    if not data.instance_mode:
        res = evaluate_labelled(test_emb, test_labels, config.seed)
        metrics.update({"seed_protocol_auc": res["auc"], "seed_protocol_pairs": res["pairs"],
                        "seed_protocol_split": "test", **{f"recall_at_{k}": v for k, v in res["recall"].items()},
                        "map_at_r": res["map_at_r"]})
        curves["test seed protocol"] = (res["genuine"], res["impostor"])
        example_rows += _example_pairs(test_images, res)
        if seen_classes is not None:
            unseen = ~np.isin(test_labels, seen_classes)
            for name, mask in (("unseen_classes", unseen), ("seen_classes", ~unseen)):
                part = evaluate_labelled(test_emb[mask], test_labels[mask], config.seed)
                metrics[name] = {"classes": sorted(int(c) for c in np.unique(test_labels[mask])),
                                 "items": int(mask.sum()), "seed_protocol_auc": part["auc"],
                                 **{f"recall_at_{k}": v for k, v in part["recall"].items()},
                                 "map_at_r": part["map_at_r"]}
                if name == "unseen_classes":
                    curves["test unseen classes"] = (part["genuine"], part["impostor"])
    # Instance protocol on test images never trained on: edited copies vs every other test image.
    n_inst = min(config.instance_test_items, len(test_images))
    test_copies = eval_copies(loaded["test_sources"][:n_inst], np.random.default_rng(config.seed + 11))
    inst = ev.calibrate_instance(embed, test_images[:n_inst], copies=test_copies, originals=test_emb[:n_inst],
                                 targets=(1e-2, 1e-3, 1e-4))
    metrics["test_instance"] = {"items": n_inst, "auc": inst["auc"],
                                "recall_at_fmr": ev.tmr_at_fmr(inst["genuine"], inst["impostor"])}
    curves["test instance"] = (inst["genuine"], inst["impostor"])
    if data.instance_mode:
        metrics["seed_protocol_auc"] = inst["auc"]
        metrics["recall_at_1"] = _copy_recall_at_1(embed(test_copies), test_emb[:n_inst])
    example_rows += _example_copies(test_images[:n_inst], test_copies, inst)
    return {"metrics": metrics, "curves": curves, "instance": inst, "example_rows": example_rows,
            "items": int(len(test_labels))}


def calibrate(config: TrainConfig, data: TrainingData, embed: Callable, eval_copies: Callable) -> dict:
    """Step 5 (cont.): thresholds calibrated on the held-out calibration images of the train pool (never the
    test split, never trained on): "instance" (edited copies against every pair) and, labelled, "class".
    Returns {"thresholds", "instance", "class" (None in instance mode)}: the calibrations' results."""
    images, labels, sources = data.loaded["images"], data.loaded["labels"], data.loaded["sources"]
    cal_images, cal_labels = images[data.cal_idx], labels[data.cal_idx]
    cal_emb = embed(cal_images)
    same, different = all_pair_scores(cal_emb, None if data.instance_mode else cal_labels)
    cal_copies = eval_copies(sources[data.cal_idx], np.random.default_rng(config.seed))
    by_instance = ev.calibrate_instance(embed, cal_images, copies=cal_copies,
                                        originals=cal_emb, impostor=np.concatenate([same, different]))
    by_class = None if data.instance_mode else ev.calibrate_class(cal_emb, cal_labels, pair_scores=(same, different))
    thresholds = {"instance": by_instance["thresholds"], "class": by_class["thresholds"] if by_class else []}
    return {"thresholds": thresholds, "instance": by_instance, "class": by_class}


def _scores_and_plots(test: dict, cal: dict, best: dict, instance_mode: bool, out: str) -> tuple[dict, dict]:
    """The card's metrics (test, calibration and validation scores) and the plots written to `out`
    ({name: path})."""
    metrics, inst, by_instance, by_class = dict(test["metrics"]), test["instance"], cal["instance"], cal["class"]
    pairs = {name: (result["genuine"], result["impostor"])
             for name, result in (("test instance", inst), ("instance", by_instance), ("class", by_class))
             if result is not None}
    curves = dict(test["curves"])
    aucs = {"test seed protocol": metrics.get("seed_protocol_auc"), "instance (calibration set)": by_instance["auc"],
            "test instance": inst["auc"]}
    hist_groups = {"test seed protocol": curves["test seed protocol"]} if "test seed protocol" in curves else {}
    fmr_groups = {"test instance": pairs["test instance"]}
    if by_class is not None:
        curves["class (calibration set)"] = hist_groups["class"] = fmr_groups["class"] = pairs["class"]
        aucs["class (calibration set)"] = by_class["auc"]
        metrics.update({"class_auc": by_class["auc"], "class_genuine_pairs": int(len(by_class["genuine"])),
                        "class_impostor_pairs": int(len(by_class["impostor"]))})
    curves["instance (calibration set)"] = hist_groups["instance"] = pairs["instance"]
    hist_groups["test instance"] = pairs["test instance"]
    metrics.update({"test_items": test["items"], "validation_auc": best["auc"],
                    "validation_metric": "instance TMR at FMR 1e-3" if instance_mode else "seed protocol AUC",
                    "instance_auc": by_instance["auc"],
                    "instance_genuine_pairs": int(len(by_instance["genuine"])),
                    "instance_impostor_pairs": int(len(by_instance["impostor"]))})
    plots = {
        "roc": ev.plot_roc(curves, os.path.join(out, "roc.png"), aucs={k: aucs.get(k) for k in curves}),
        "similarity_hist": ev.plot_similarity_hist(hist_groups, os.path.join(out, "similarity_hist.png"),
                                                   cal["thresholds"]),
        "fmr_fnmr": ev.plot_fmr_fnmr(fmr_groups, os.path.join(out, "fmr_fnmr.png")),
        "example_pairs": ev.plot_example_pairs(test["example_rows"], os.path.join(out, "example_pairs.png")),
    }
    return metrics, plots


def train(config: TrainConfig, resume_state: dict | None = None) -> dict:
    """Train, evaluate, calibrate and export. Returns a summary dict (paths, scores, seconds)."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    from siamese_core.artefact import export_encoder
    deterministic, mixed = start_runtime(config)
    rng = np.random.default_rng(config.seed)

    # 1. data and sampler
    data = prepare_data(config, rng)
    views = 2 if data.instance_mode else config.views
    sampler, shape = make_sampler(config, data, views)
    edit, eval_copies = make_edit(config, data.input_spec), make_eval_copies(config, data.input_spec)
    _log(config, f"{data.kind} mode: train {len(data.train_idx)} items, validation {len(data.val_idx)}, calibration "
                 f"{len(data.cal_idx)}, test {len(data.loaded['test_labels'])}; {len(sampler)} batches of {shape} "
                 f"per epoch{'; mixed precision' if mixed else ''}")
    # 2. the encoder and its loss
    trainee = build_trainee(config, data, views, len(sampler) * config.epochs, mixed)
    # 3. the epochs
    history, best, train_seconds = train_epochs(config, data, trainee, sampler, views, edit, eval_copies, rng,
                                                resume_state)
    model, embed = export_tower(config, data, trainee, best, mixed)
    _log(config, f"best epoch {best['epoch']} (validation {best['auc']:.4f}); trained in {train_seconds:.0f}s")
    # 4. evaluate and calibrate
    out = config.output_dir
    os.makedirs(out, exist_ok=True)
    test = evaluate_test(config, data, embed, eval_copies)
    cal = calibrate(config, data, embed, eval_copies)
    metrics, plots = _scores_and_plots(test, cal, best, data.instance_mode, out)
    # 5. export
    training = {**dataclasses.asdict(config), "views": views, "epochs_run": len(history),
                "best_epoch": best["epoch"], "history": history, "train_seconds": round(train_seconds, 1),
                "optimizer": "adam, cosine decay" + (", weight EMA" if config.ema_momentum > 0 else ""),
                "mixed_precision": mixed, "deterministic": deterministic,
                "model": {"builder": "trainer.encoder.build_encoder", **encoder_kwargs(config)},
                "resumed": resume_state is not None}
    card = export_encoder(model, out, training=training, data=_data_record(data), metrics=metrics,
                          thresholds=cal["thresholds"], input_spec=data.input_spec, hard_negatives=data.hard_record)
    summary = _summary(card, metrics, cal["thresholds"], plots, history, best, data.hard_record, out,
                       train_seconds, t_start, cpu_start)
    _log(config, f"test AUC {metrics['seed_protocol_auc']:.4f}  recall@1 {metrics.get('recall_at_1') or 0:.4f}  "
                 f"instance recall@FMR {summary['instance_recall_at_fmr']}  -> {out} "
                 f"(model_id {card['model_id']}, {summary['total_seconds']:.0f}s in all)")
    return summary


def _data_record(data: TrainingData) -> dict:
    """The card's `data`: the source and how it was split."""
    return {**data.loaded["description"], "mode": data.kind, "train_items": int(len(data.train_idx)),
            "validation_items": int(len(data.val_idx)), "calibration_items": int(len(data.cal_idx)),
            "classes": None if data.instance_mode else int(len(np.unique(data.y_train))),
            "train_classes": data.seen_classes,
            "calibration": "held-out slice of the train split (not trained on, not used for early stopping)"}


def _summary(card: dict, metrics: dict, thresholds: dict, plots: dict, history: list, best: dict,
             hard_record: dict | None, out: str, train_seconds: float, t_start: float, cpu_start: float) -> dict:
    """What train() returns (and `run` prints): the artefact, its headline scores, the seconds spent."""
    summary = {
        "model_dir": out, "model_id": card["model_id"], "seed_auc": metrics["seed_protocol_auc"],
        "recall_at_1": metrics.get("recall_at_1"), "recall_at_5": metrics.get("recall_at_5"),
        "map_at_r": metrics.get("map_at_r"), "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1), "epochs_run": len(history),
        "best_epoch": best["epoch"], "validation_auc": best["auc"],
        "instance_recall_at_fmr": {str(r["target_fmr"]): r["tmr"] for r in metrics["test_instance"]["recall_at_fmr"]},
        "thresholds": {k: len(v) for k, v in thresholds.items()}, "plots": plots,
        "hard_negatives": hard_record,
    }
    if "unseen_classes" in metrics:
        summary["unseen_classes"] = {k: metrics["unseen_classes"][k]
                                     for k in ("classes", "seed_protocol_auc", "recall_at_1", "map_at_r")}
    return summary


def evaluate_labelled(emb: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """Seed protocol, recall@{1,5,10} and MAP@R of labelled embeddings."""
    seed_res = ev.seed_protocol(emb, labels, seed=seed)
    ks = tuple(k for k in (1, 5, 10) if k < len(labels))
    return {**seed_res, "recall": ev.recall_at_k(emb, labels, ks=ks),
            "map_at_r": ev.map_at_r(emb, labels)}


def _copy_recall_at_1(copies_emb: np.ndarray, originals: np.ndarray) -> float:
    """Instance mode: fraction of edited copies (embeddings, row k a copy of original k) whose nearest
    original is their own source image."""
    return float(np.mean(np.argmax(copies_emb @ originals.T, axis=1) == np.arange(len(originals))))


def _example_pairs(images, res) -> list:
    """The four weakest genuine and the four strongest impostor pairs of the seed protocol `res` (the
    errors to look at)."""
    anchors, positives, negatives = res["anchors"], res["positives"], res["negatives"]
    rows = [("weak genuine", images[anchors[i]], images[positives[i]], float(res["genuine"][i]))
            for i in np.argsort(res["genuine"])[:4]]
    rows += [("strong impostor", images[anchors[i]], images[negatives[i]], float(res["impostor"][i]))
             for i in np.argsort(-res["impostor"])[:4]]
    return rows


def _example_copies(images, copies, inst) -> list:
    """The four weakest edited copies of the instance protocol, beside their originals."""
    return [("weak copy", images[i], copies[i], float(inst["genuine"][i])) for i in np.argsort(inst["genuine"])[:4]]


# --- command line -----------------------------------------------------------------------------------------

def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    # Imports Keras: here, not at module load (the JAX bench picks its backend first).
    from trainer.encoder import BACKBONES, INPUT_NORMS, PADDINGS, POOLINGS
    from trainer.losses import BATCH_LOSSES, DISTANCES, INSTANCE_LOSSES, MINERS
    d = TrainConfig()
    defaults = PRESETS.get(preset, {}) if preset else {}

    def dflt(name):
        return defaults.get(name, getattr(d, name))

    parser = argparse.ArgumentParser(
        prog="siamese-dedup train",
        description="Train the Siamese/triplet image encoder and export the encoder artefact "
                    "(model.keras + model_card.json with test metrics and calibrated thresholds, plus roc.png, "
                    "similarity_hist.png, fmr_fnmr.png and example_pairs.png) to --output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=False, help="artefact directory to write (created if missing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=preset,
                        help="a named recipe: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    g = parser.add_argument_group("data")
    g.add_argument("--data", choices=SOURCES, default=dflt("data"),
                   help="fashion_mnist (IDX files); folder (one subfolder per class); pairs (two folders whose "
                        "same-named files are positive pairs); unlabelled (instance mode); npz (arrays 'images' "
                        "[+ 'labels']); photo_corpus (tiles of Debian's photo packages, instance mode)")
    g.add_argument("--data_path", default=None, help="the folder / .npz file of --data (fashion_mnist: IDX dir; "
                                                     "photo_corpus: its sources, comma-separated, default the "
                                                     "training side of trainer.photo_corpus.DEFAULT_SPLIT)")
    g.add_argument("--data_dir", default=None,
                   help="directory of the Fashion-MNIST IDX .gz files (default $FASHION_MNIST_DIR or "
                        "/usr/share/datasets/fashion-mnist)")
    g.add_argument("--image_size", type=int, default=dflt("image_size"),
                   help="other sources: images are decoded and resized to this square side (default 64; npz: "
                        "as stored)")
    g.add_argument("--channels", type=int, choices=CHANNELS, default=dflt("channels"),
                   help="other sources: 1 grey or 3 RGB")
    g.add_argument("--test_fraction", type=float, default=dflt("test_fraction"),
                   help="other sources: share held out as the test split (whole pairs / classes stratified)")
    g.add_argument("--train_classes", default=None,
                   help="comma-separated class ids to train on; the test metrics are also reported for the "
                        "other (unseen) classes")
    g.add_argument("--instance_only", action="store_true", default=dflt("instance_only"),
                   help="instance mode on labelled data: ignore the labels, every image is its own identity")
    g.add_argument("--hard_negatives", default=None, metavar="FILE",
                   help="pairs of images a person confirmed are NOT copies (siamese-dedup review import): "
                        f"{hn.FORMAT_HELP}. Instance mode only: each image becomes a training identity and "
                        "every batch carries whole pairs (about a quarter of it), so the loss pushes them apart; "
                        "rows whose images do not read or decode are skipped and counted in the model card")
    g = parser.add_argument_group("model")
    g.add_argument("--backbone", choices=BACKBONES, default=dflt("backbone"),
                   help="encoder body")
    g.add_argument("--weights", default=None,
                   help="Applications backbones: 'imagenet' (needs the internet), or a local weights file; "
                        "default random")
    g.add_argument("--freeze_until", default=None, help="freeze the backbone up to and including this layer")
    g.add_argument("--alpha", type=float, default=dflt("alpha"), help="MobileNetV2 width multiplier")
    g.add_argument("--backbone_input_size", type=int, default=None,
                   help="resize to this side before an Applications backbone (default: input size, >= 32)")
    g.add_argument("--filters", default=dflt("filters"), help="small_cnn: channels of the conv stages")
    g.add_argument("--convs_per_stage", type=int, default=dflt("convs_per_stage"),
                   help="small_cnn: 3x3 convs per stage, before its pooling")
    g.add_argument("--padding", choices=PADDINGS, default=dflt("padding"), help="small_cnn conv padding")
    g.add_argument("--pooling", choices=POOLINGS, default=dflt("pooling"),
                   help="small_cnn: flatten the last feature map (where features are) or pool it globally "
                        "(avg, avg_max: a crop or a pad moves little)")
    g.add_argument("--input_norm", choices=INPUT_NORMS, default=dflt("input_norm"),
                   help="small_cnn: standardize each image (brightness/contrast edits vanish), or take its "
                        "luminance and standardize it (grey and colour-shifted copies too)")
    g.add_argument("--thumbnail", type=int, default=dflt("thumbnail"),
                   help="small_cnn: > 0 adds a parameter-free branch, the input averaged down to this side, "
                        "beside the conv features before the head (0: off)")
    g.add_argument("--batch_norm", action=argparse.BooleanOptionalAction, default=dflt("batch_norm"),
                   help="small_cnn: BatchNormalization after each conv")
    g.add_argument("--dense_units", type=int, default=dflt("dense_units"), help="hidden layer of the head (0: none)")
    g.add_argument("--dropout", type=float, default=dflt("dropout"), help="dropout before the projection")
    g.add_argument("--embedding_dim", type=int, default=dflt("embedding_dim"), help="length of the embeddings")
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=dflt("epochs"), help="maximum number of epochs")
    g.add_argument("--epoch_items", type=int, default=dflt("epoch_items"),
                   help="embeddings of work per epoch (default: the training set's size); fixes the training "
                        "time whatever the catalogue's size")
    g.add_argument("--loss", choices=BATCH_LOSSES, default=dflt("loss"), help="in-batch loss")
    g.add_argument("--margin", type=float, default=dflt("margin"),
                   help="triplet margin (contrastive: the negative margin), in units of --distance")
    g.add_argument("--distance", choices=DISTANCES, default=dflt("distance"),
                   help="distance inside the loss (cosine = 1 - cos)")
    g.add_argument("--mining", choices=tuple(MINERS), default=dflt("mining"),
                   help="triplet mining: batch-all positive triplets, FaceNet semi-hard, or batch-hard")
    g.add_argument("--classes_per_batch", type=int, default=dflt("classes_per_batch"),
                   help="P of a P x K batch (instance mode: P*K images per batch)")
    g.add_argument("--per_class", type=int, default=dflt("per_class"), help="K of a P x K batch (pairs: 2)")
    g.add_argument("--learning_rate", type=float, default=dflt("learning_rate"), help="Adam peak learning rate")
    g.add_argument("--seed", type=int, default=dflt("seed"), help="seed of every random choice")
    g.add_argument("--no_augment", dest="augment", action="store_false",
                   help="train on the original pixels only (no near-duplicate edits)")
    g.add_argument("--edits", choices=EDITS, default=dflt("edits"),
                   help="how training copies are made: near_duplicate (trainer.augment: small shifts, rotation, "
                        "contrast, JPEG-like blocking; for Fashion-MNIST) or copy (trainer.copy_edits: the edits "
                        "photo copies go through: crops, padding, borders, captions, text, grey, colour, blur, "
                        "JPEG, rotation, mirror, screenshots; RGB only)")
    g.add_argument("--score_norm", choices=SCORE_NORMS, default=dflt("score_norm"),
                   help="recorded in the card: how the match stage scores this model's pairs by default (none: "
                        "angular similarity; knn: less each item's similarity to its k-th neighbour, "
                        "siamese_core.similarity.knn_normalised)")
    g.add_argument("--trim_borders", action=argparse.BooleanOptionalAction, default=dflt("trim_borders"),
                   help="other sources: decoding cuts plain bands at the edges (letterbox bars, frames, caption "
                        "bars) before the resize; recorded in the card's input spec, so embed does the same")
    g.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=dflt("mirror"),
                   help="copy edits: a left-right mirror counts as a copy (--no-mirror: it is another item)")
    g.add_argument("--edit_source_size", type=int, default=dflt("edit_source_size"),
                   help="copy edits: side the photos are decoded at for editing (default 2 x --image_size)")
    g.add_argument("--instance_loss", choices=INSTANCE_LOSSES, default=dflt("instance_loss"),
                   help="the copy (instance) loss: triplet (batch-all, --instance_margin) or info_nce (every "
                        "other image of the batch a negative, --temperature)")
    g.add_argument("--temperature", type=float, default=dflt("temperature"),
                   help="info_nce: temperature of the softmax over cosines")
    g.add_argument("--koleo_weight", type=float, default=dflt("koleo_weight"),
                   help="instance mode: weight of the KoLeo term that spreads embeddings apart (0: off)")
    g.add_argument("--augment_prob", type=float, default=dflt("augment_prob"),
                   help="chance that a training view is edited by trainer.augment")
    g.add_argument("--views", type=int, choices=VIEWS, default=dflt("views"),
                   help="augmented views per image per batch; 2 adds an instance (near-duplicate) loss")
    g.add_argument("--instance_weight", type=float, default=dflt("instance_weight"),
                   help="weight of the instance (near-duplicate) triplet loss when --views 2")
    g.add_argument("--instance_margin", type=float, default=dflt("instance_margin"),
                   help="margin of the instance loss: an edited copy must be this much closer than "
                        "any other image, same class included")
    g.add_argument("--proxy_weight", type=float, default=dflt("proxy_weight"),
                   help="labelled classes: weight of a normalized-softmax loss on one learnt proxy per class, "
                        "added to the triplet loss (0: triplet loss only)")
    g.add_argument("--proxy_temperature", type=float, default=dflt("proxy_temperature"),
                   help="temperature of the proxy loss's softmax over cosines")
    g.add_argument("--ema_momentum", type=float, default=dflt("ema_momentum"),
                   help="> 0: keep an exponential moving average of the weights (e.g. 0.99 per step) and "
                        "validate and export it instead of the last weights")
    g.add_argument("--validation_split", type=float, default=dflt("validation_split"),
                   help="fraction of the train split held out for early stopping and calibration")
    g.add_argument("--keep_epoch", choices=KEEP_EPOCHS, default=dflt("keep_epoch"),
                   help="export the best epoch by validation score, or the last epoch")
    g.add_argument("--patience", type=int, default=dflt("patience"),
                   help="stop after this many epochs without a better validation score")
    g.add_argument("--max_train_items", type=int, default=None,
                   help="use only this many train-split images (quick tests)")
    g.add_argument("--max_test_items", type=int, default=None,
                   help="evaluate on only the first this many test images (quick tests)")
    g.add_argument("--instance_test_items", type=int, default=dflt("instance_test_items"),
                   help="test images of the instance protocol (all pairs of them are the impostors)")
    g.add_argument("--mixed_precision", choices=MIXED_PRECISION, default=dflt("mixed_precision"),
                   help="float16 compute with float32 weights (auto: when a GPU is present); the exported "
                        "model is float32 either way")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=dflt("deterministic"),
                   help="TensorFlow runs one op at a time, so a seed always gives the same model (default; about "
                        "1.05x the epoch time on 2 cores); --no-deterministic: ops side by side, not bit-reproducible")
    g.add_argument("--checkpoint_dir", default=None, help="save a resumable checkpoint here after every epoch")
    g.add_argument("--resume", default=None, help="continue the run checkpointed in this directory")
    g.add_argument("--stop_after_epoch", type=int, default=None,
                   help="end the run after this epoch as if interrupted (the checkpoint can be resumed)")
    g.add_argument("--tensorboard_dir", default=None, help="write TensorBoard logs (losses, validation) here")
    parser.add_argument("--quiet", dest="verbose", action="store_false", help="no per-epoch progress")
    return parser


def _flag_values(argv: Sequence[str]) -> dict:
    """Every flag's value in `argv`: explicit flags, else the --preset's value, else TrainConfig's default."""
    first, _ = build_parser().parse_known_args(argv)
    return vars(build_parser(first.preset).parse_args(argv))


def config_from_flags(argv: Sequence[str]) -> TrainConfig:
    """The TrainConfig a command line asks for (its --output, if any, as output_dir; --resume ignored)."""
    values = _flag_values(argv)
    values.pop("resume")
    output = values.pop("output")
    return TrainConfig(**values, **({"output_dir": output} if output else {}))


def run(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point: parse flags, train, return the summary dict (also printed as JSON)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values = _flag_values(argv)
    resume = values.pop("resume")
    output = values.pop("output")
    resume_state = None
    if resume:
        path = os.path.join(resume, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--resume {resume}: no {STATE_FILE} (not a checkpoint directory)")
        with open(path) as f:
            resume_state = json.load(f)
        stored = resume_state["config"]
        given = {a for a in argv if a.startswith("--")}
        stored.update({"checkpoint_dir": resume, "verbose": values["verbose"],
                       "stop_after_epoch": values["stop_after_epoch"]})
        if "--epochs" in given:
            stored["epochs"] = values["epochs"]
        output = output or stored["output_dir"]
        stored["output_dir"] = output
        config = TrainConfig(**stored)
    else:
        if not output:
            build_parser().error("--output is required (unless --resume)")
        config = TrainConfig(output_dir=output, **values)
    summary = train(config, resume_state)
    if config.verbose:
        print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    try:
        run()
    except TrainingCollapsed as err:
        sys.exit(f"error: {err}")
