"""How good is an encoder, and where should the match threshold be? NumPy + scikit-learn (no TensorFlow).

Scores are angular similarities (siamese_core.similarity, the one definition), higher = more alike. A pair is
declared a match when its score is >= the threshold.

  seed_protocol    for each test anchor, one random positive (same class, other image) and one random
                   negative (other class), fixed seed; ROC AUC of positive vs negative scores.
  recall_at_k      nearest neighbours by cosine (self excluded) share the query's label; computed in blocks
                   of queries, never an N x N matrix.
  thresholds_at_fmr
                   the threshold at each target false match rate, with the number of impostor pairs behind
                   it, the FMR achieved, its one-sided 95% Clopper-Pearson upper bound, and the FNMR. A target
                   the data cannot support (fewer than 3/target impostor pairs: the "rule of three") is left
                   out rather than guessed.
  calibrate_class / calibrate_instance
                   genuine and impostor scores for the model card's two protocols (see SPEC), then thresholds.
  map_at_r         MAP@R (Musgrave et al. 2020): for a query with R same-label items, the mean over the R
                   nearest neighbours of precision@i at each neighbour i that is relevant, divided by R.
  plots            ROC, genuine vs impostor histograms, FMR/FNMR against the threshold, example pairs.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Sequence

import numpy as np

from siamese_core.error_rates import RULE_OF_THREE, rate_upper_bound
from siamese_core.similarity import all_pair_scores, angular_similarity, cosine_from_angular, cosine_similarity, l2_normalize
from trainer.samplers import other_class_partners, same_class_partners

DEFAULT_FMR_TARGETS = (1e-2, 1e-3, 1e-4, 1e-5)


# --- embeddings -------------------------------------------------------------------------------------------

def embed_images(model, images: np.ndarray, batch_size: int = 1024, predict_fn=None) -> np.ndarray:
    """Embed uint8 images (n, H, W) or (n, H, W, C) with a Keras encoder -> float32 unit vectors (n, dim).

    predict_fn: optional faster call for one float32 batch (e.g. a tf.function around
    model(x, training=False)); default calls the model eagerly.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    call = predict_fn or (lambda batch: model(batch, training=False))
    out = [np.asarray(call(x[i:i + batch_size].astype(np.float32))) for i in range(0, len(x), batch_size)]
    dim = int(model.output_shape[-1])
    return l2_normalize(np.concatenate(out) if out else np.zeros((0, dim), np.float32))


# --- protocols --------------------------------------------------------------------------------------------

def roc_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """ROC AUC of genuine (label 1) vs impostor (label 0) scores (sklearn.metrics.roc_auc_score)."""
    from sklearn.metrics import roc_auc_score
    y = np.concatenate([np.ones(len(genuine)), np.zeros(len(impostor))])
    return float(roc_auc_score(y, np.concatenate([genuine, impostor])))


def rank_auc(genuine: np.ndarray, impostor: np.ndarray, sorted_impostor: bool = False) -> float:
    """The same ROC AUC as `roc_auc` (ties count one half), from one sort of the impostor scores:
    P(genuine > impostor) + P(genuine == impostor) / 2. For millions of pairs, where sklearn is slow."""
    imp = np.asarray(impostor) if sorted_impostor else np.sort(np.asarray(impostor))
    g = np.asarray(genuine)
    if len(g) == 0 or len(imp) == 0:
        raise ValueError("AUC needs genuine and impostor scores")
    below = np.searchsorted(imp, g, side="left").astype(np.float64)
    ties = np.searchsorted(imp, g, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (len(g) * len(imp)))


def seed_protocol(embeddings: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Seed protocol: each item is an anchor once, with a random same-class positive and other-class negative.

    Args:
      embeddings: float32 (n, d) unit vectors; labels: int (n,).
      seed: fixes the choice of partners (same seed, same pairs).
    Returns: {"auc", "pairs" (anchors used), "genuine" (m,), "impostor" (m,)} -- scores in angular
    similarity -- and the pairs behind them: "anchors", "positives", "negatives" (m,) row indices.
    Anchors whose class has a single member are skipped (they have no positive).
    """
    labels = np.asarray(labels).reshape(-1)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    anchors = np.flatnonzero(counts[inverse] >= 2)
    rng = np.random.default_rng(seed)
    positives = same_class_partners(labels, anchors, rng)
    negatives = other_class_partners(labels, anchors, rng)
    emb = np.asarray(embeddings, np.float32)
    genuine = angular_similarity(cosine_similarity(emb[anchors], emb[positives]))
    impostor = angular_similarity(cosine_similarity(emb[anchors], emb[negatives]))
    return {"auc": roc_auc(genuine, impostor), "pairs": int(len(anchors)),
            "genuine": genuine, "impostor": impostor,
            "anchors": anchors, "positives": positives, "negatives": negatives}


def nearest_neighbours(embeddings: np.ndarray, k: int = 1, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest neighbours of every row by cosine, excluding itself -> (indices (n, k), cosines (n, k)),
    best first. Works on `block` query rows at a time: memory O(block x n), never n x n."""
    emb = np.asarray(embeddings, np.float32)
    n = len(emb)
    k = min(k, n - 1)
    if k < 1:
        raise ValueError("nearest neighbours need at least two embeddings")
    idx = np.empty((n, k), np.int64)
    cos = np.empty((n, k), np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = emb[start:stop] @ emb.T
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # never your own neighbour
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        part_sims = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_sims, axis=1, kind="stable")
        idx[start:stop] = np.take_along_axis(part, order, axis=1)
        cos[start:stop] = np.take_along_axis(part_sims, order, axis=1)
    return idx, cos


def recall_at_k(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1,), block: int = 512) -> dict:
    """Fraction of queries with a same-label item among their k nearest neighbours (self excluded).

    Returns {k: recall} for each k in ks. Every item is a query.
    """
    labels = np.asarray(labels).reshape(-1)
    idx, _ = nearest_neighbours(embeddings, max(ks), block)
    hit = labels[idx] == labels[:, None]
    return {int(k): float(np.mean(np.any(hit[:, :k], axis=1))) for k in ks}


def map_at_r(embeddings: np.ndarray, labels: np.ndarray, block: int = 256) -> float:
    """MAP@R over every item as a query (self excluded); items whose label has no other member are skipped.

    For a query with R other items of its label: AP@R = (1/R) * sum_{i<=R, neighbour i relevant} P@i,
    where P@i is the precision of the first i neighbours. Blocked: memory O(block x n).
    """
    emb = np.asarray(embeddings, np.float32)
    labels = np.asarray(labels).reshape(-1)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    r_all = counts[inverse] - 1
    r_max = int(r_all.max()) if len(r_all) else 0
    if r_max < 1:
        raise ValueError("MAP@R needs a label with at least two items")
    total, queries = 0.0, 0
    for start in range(0, len(emb), block):
        stop = min(start + block, len(emb))
        sims = emb[start:stop] @ emb.T
        sims[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        top = np.argpartition(-sims, r_max - 1, axis=1)[:, :r_max] if r_max < len(emb) - 1 \
            else np.argsort(-sims, axis=1)[:, :r_max]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        rel = labels[top] == labels[start:stop, None]                 # (b, r_max)
        r = r_all[start:stop]
        within = np.arange(1, r_max + 1)[None, :] <= r[:, None]        # only the first R neighbours count
        rel &= within
        precision = np.cumsum(rel, axis=1) / np.arange(1, r_max + 1)[None, :]
        ap = np.sum(precision * rel, axis=1) / np.maximum(r, 1)
        valid = r >= 1
        total += float(ap[valid].sum())
        queries += int(valid.sum())
    return total / queries


def tmr_at_fmr(genuine: np.ndarray, impostor: np.ndarray,
               targets: Sequence[float] = (1e-2, 1e-3, 1e-4)) -> list[dict]:
    """True match rate (1 - FNMR, "recall") at each supported target FMR, with the threshold and the
    impostor pairs behind it (thresholds_at_fmr; unsupported targets are left out)."""
    return [{"target_fmr": t["target_fmr"], "tmr": None if t["fnmr"] is None else 1.0 - t["fnmr"],
             "angular_similarity": t["angular_similarity"], "impostor_pairs": t["impostor_pairs"],
             "genuine_pairs": t["genuine_pairs"], "fmr": t["fmr"], "fmr_upper_95": t["fmr_upper_95"]}
            for t in thresholds_at_fmr(genuine, impostor, targets)]


# --- error rates and thresholds ---------------------------------------------------------------------------

def fmr_fnmr(genuine: np.ndarray, impostor: np.ndarray, thresholds: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    """False match rate (impostor score >= t) and false non-match rate (genuine score < t) at each t."""
    g = np.sort(np.asarray(genuine, np.float64))
    i = np.sort(np.asarray(impostor, np.float64))
    t = np.asarray(list(thresholds), np.float64)
    fmr = (len(i) - np.searchsorted(i, t, side="left")) / max(len(i), 1)
    fnmr = np.searchsorted(g, t, side="left") / max(len(g), 1)
    return fmr, fnmr


# When nothing scores above the score that must be excluded, the cut goes this far (in cosine) above it:
# clear of float32 rounding in the pipelines' dot products, far below any gap that matters.
_TOP_GAP = 1e-6


def _threshold_between(lower: float, upper: float) -> float:
    """A cut strictly above `lower` and at most `upper`: the midpoint, or the next float if they touch."""
    mid = (lower + upper) / 2.0
    return mid if mid > lower else float(np.nextafter(lower, np.inf))


def thresholds_at_fmr(genuine: np.ndarray, impostor: np.ndarray,
                      targets: Sequence[float] = DEFAULT_FMR_TARGETS) -> list[dict]:
    """Calibrated thresholds (THRESHOLD_SCHEMA dicts) at each supported target FMR.

    Args:
      genuine, impostor: angular similarity scores (any length); genuine may be empty (fnmr is then None).
      targets: target false match rates in (0, 1).
    For each target t with n impostor pairs >= 3/t: allow m = floor(t n) false matches; the threshold lies
    between the (m+1)-th and m-th highest impostor score (the midpoint, in cosine), so at most m impostors
    reach it; ties push it up. Reported: achieved fmr, its 95% upper bound, fnmr at that threshold.
    Computed in cosine (what the pipelines compare), angular_similarity stored beside it.
    """
    impostor = np.asarray(impostor, np.float64)
    n = len(impostor)
    # Work in cosine: thresholds are compared in cosine downstream, so the cut is exact there.
    imp_cos = np.sort(cosine_from_angular(np.clip(impostor, 0, 1)))[::-1]
    gen_cos = cosine_from_angular(np.clip(np.asarray(genuine, np.float64), 0, 1))
    results = []
    for target in targets:
        if not 0 < target < 1:
            raise ValueError(f"target FMR must lie in (0, 1), got {target}")
        if n < RULE_OF_THREE / target:
            continue  # not enough impostor pairs to say anything at this FMR
        m = int(math.floor(target * n + 1e-9))
        at = imp_cos[m]  # the (m+1)-th highest: must fall below the threshold
        above = imp_cos[imp_cos > at]
        cut = _threshold_between(at, float(above.min())) if len(above) else at + _TOP_GAP
        cut = min(cut, 1.0)
        false_matches = int(np.sum(imp_cos >= cut))
        fnmr = float(np.mean(gen_cos < cut)) if len(gen_cos) else None
        results.append({
            "target_fmr": float(target),
            "angular_similarity": float(angular_similarity(cut)),
            "cosine": float(cut),
            "impostor_pairs": int(n),
            "false_matches": false_matches,
            "fmr": false_matches / n,
            "fmr_upper_95": rate_upper_bound(false_matches, n),
            "genuine_pairs": int(len(gen_cos)),
            "fnmr": fnmr,
        })
    return results


def error_rate_table(genuine: np.ndarray, impostor: np.ndarray, thresholds: Sequence[float]) -> list[dict]:
    """FMR / FNMR at given angular thresholds with the pair counts behind each figure (for reports)."""
    fmr, fnmr = fmr_fnmr(genuine, impostor, thresholds)
    n_imp, n_gen = len(impostor), len(genuine)
    return [{"angular_similarity": float(t), "cosine": float(cosine_from_angular(t)),
             "impostor_pairs": int(n_imp), "false_matches": int(round(a * n_imp)), "fmr": float(a),
             "fmr_upper_95": rate_upper_bound(int(round(a * n_imp)), n_imp),
             "genuine_pairs": int(n_gen), "fnmr": float(b) if n_gen else None}
            for t, a, b in zip(thresholds, fmr, fnmr)]


# --- the model card's two calibration protocols ----------------------------------------------------------

def _auc_or_none(genuine: np.ndarray, impostor: np.ndarray) -> float | None:
    return rank_auc(genuine, impostor) if len(genuine) and len(impostor) else None


def calibrate_class(embeddings: np.ndarray, labels: np.ndarray,
                    targets: Sequence[float] = DEFAULT_FMR_TARGETS, pair_scores=None) -> dict:
    """"class" protocol: genuine = all same-class pairs, impostor = all different-class pairs (i < j).

    pair_scores: all_pair_scores(embeddings, labels) if already computed.
    Returns {"protocol", "genuine", "impostor", "auc", "thresholds"}.
    """
    genuine, impostor = pair_scores if pair_scores is not None else all_pair_scores(embeddings, labels)
    return {"protocol": "class", "genuine": genuine, "impostor": impostor,
            "auc": _auc_or_none(genuine, impostor), "thresholds": thresholds_at_fmr(genuine, impostor, targets)}


def calibrate_instance(embed_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, *, seed: int = 0,
                       targets: Sequence[float] = DEFAULT_FMR_TARGETS,
                       originals: np.ndarray | None = None, impostor: np.ndarray | None = None,
                       copies: np.ndarray | None = None) -> dict:
    """"instance" protocol (near-duplicates): genuine = (image, augment_image(image)) for each held-out image,
    impostor = all pairs of distinct held-out images, any class.

    Args:
      embed_fn: uint8 images (n, H, W[, C]) -> unit embeddings (n, d), e.g. lambda x: embed_images(model, x).
      images: the held-out images (uint8); seed fixes the augmentations.
      originals: their embeddings if already computed (saves one pass).
      impostor: the all-pairs scores of `originals` if already computed (e.g. both parts of
        all_pair_scores(originals, labels) concatenated).
      copies: the edited copies (row k a copy of images[k]) if made elsewhere (e.g. trainer.copy_edits);
        default trainer.augment's edits, seeded by `seed`.
    Returns {"protocol", "genuine", "impostor", "auc", "thresholds"}.
    """
    if copies is None:
        from trainer.augment import augment_batch
        copies = augment_batch(np.asarray(images), np.random.default_rng(seed))
    emb = embed_fn(images) if originals is None else np.asarray(originals, np.float32)
    genuine = angular_similarity(cosine_similarity(emb, embed_fn(copies)))
    if impostor is None:
        _, impostor = all_pair_scores(emb, None)
    return {"protocol": "instance", "genuine": genuine, "impostor": impostor,
            "auc": _auc_or_none(genuine, impostor), "thresholds": thresholds_at_fmr(genuine, impostor, targets)}


# --- plots ------------------------------------------------------------------------------------------------

def roc_points(genuine: np.ndarray, impostor: np.ndarray, points: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """(fmr, 1 - fnmr) at thresholds spread over the impostor quantiles (log-spaced FMRs down to
    1/len(impostor)) and evenly over [0, 1]: a faithful curve from a few hundred points, even for millions
    of pairs."""
    imp = np.asarray(impostor, np.float64)
    floor = 1.0 / max(len(imp), 1)
    levels = np.logspace(np.log10(floor), 0, points)
    grid = np.concatenate([np.quantile(imp, 1 - levels), np.linspace(0, 1, points), [1.0 + 1e-9]]) \
        if len(imp) else np.linspace(0, 1, points)
    fmr, fnmr = fmr_fnmr(genuine, impostor, np.unique(grid))
    return fmr, 1.0 - fnmr


def plot_roc(curves: dict, path: str, aucs: dict | None = None) -> str:
    """ROC curves (FMR on a log axis vs 1 - FNMR) of {name: (genuine, impostor)} to a PNG; returns path.
    aucs: {name: auc} if already known (else computed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    for name, (genuine, impostor) in curves.items():
        fmr, tmr = roc_points(genuine, impostor)
        floor = 1.0 / max(len(impostor), 1)
        auc = (aucs or {}).get(name)
        auc = rank_auc(genuine, impostor) if auc is None else auc
        ax.plot(np.maximum(fmr, floor), tmr, label=f"{name} (AUC {auc:.4f}, {len(impostor):,} impostor pairs)")
    ax.set_xscale("log")
    ax.set_xlabel("false match rate")
    ax.set_ylabel("true match rate (1 - FNMR)")
    ax.set_title("ROC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save_figure(fig, path)


def plot_similarity_hist(groups: dict, path: str, thresholds: dict | None = None, bins: int = 100) -> str:
    """Genuine vs impostor angular-similarity histograms, one panel per {name: (genuine, impostor)},
    densities (so a few genuine pairs show beside millions of impostors); vertical lines at
    {name: [threshold dicts]}. Returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(groups), 1, figsize=(6, 2.6 * len(groups)), dpi=110, squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    for ax, (name, (genuine, impostor)) in zip(axes[:, 0], groups.items()):
        # np.histogram + stairs: matplotlib's hist is slow on millions of impostor scores.
        for scores, colour, what in ((impostor, "tab:red", "impostor"), (genuine, "tab:blue", "genuine")):
            counts, _ = np.histogram(scores, bins=edges, density=len(scores) > 0)
            ax.stairs(counts, edges, fill=True, alpha=0.6, color=colour, label=f"{what} ({len(scores):,})")
        for t in (thresholds or {}).get(name, []):
            ax.axvline(t["angular_similarity"], color="k", lw=0.8, ls="--")
            ax.text(t["angular_similarity"], ax.get_ylim()[1] * 0.9, f" FMR {t['target_fmr']:g}",
                    fontsize=6, rotation=90, va="top")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("angular similarity")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper left")
    return _save_figure(fig, path)


def plot_fmr_fnmr(groups: dict, path: str, points: int = 400) -> str:
    """FMR (log) and FNMR against the angular threshold, one colour per {name: (genuine, impostor)}:
    where each error rate stands at every threshold one might pick. Returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=110)
    for colour, (name, (genuine, impostor)) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"],
                                                    groups.items()):
        lo = float(min(np.min(genuine) if len(genuine) else 1, np.min(impostor) if len(impostor) else 1))
        t = np.linspace(max(0.0, lo - 0.01), 1.0, points)
        fmr, fnmr = fmr_fnmr(genuine, impostor, t)
        floor = 1.0 / max(len(impostor), 1)
        ax.plot(t, np.maximum(fmr, floor), color=colour, label=f"{name} FMR ({len(impostor):,} impostor)")
        ax.plot(t, np.maximum(fnmr, floor), color=colour, ls="--", label=f"{name} FNMR ({len(genuine):,} genuine)")
    ax.set_yscale("log")
    ax.set_xlabel("threshold (angular similarity)")
    ax.set_ylabel("error rate")
    ax.set_title("FMR / FNMR against the threshold")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="lower left")
    return _save_figure(fig, path)


def plot_example_pairs(rows: Sequence[tuple[str, np.ndarray, np.ndarray, float]], path: str,
                       columns: int = 4) -> str:
    """Example pairs with their scores: rows of (caption, image_a, image_b, angular similarity), images uint8
    (H, W) or (H, W, C). Drawn side by side, `columns` pairs per line. Returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(rows), 1)
    lines = (n + columns - 1) // columns
    fig, axes = plt.subplots(lines, 2 * columns, figsize=(2 * columns * 1.1, lines * 1.45), dpi=110,
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (caption, a, b, score) in enumerate(rows):
        r, c = divmod(i, columns)
        for j, img in enumerate((a, b)):
            img = np.asarray(img)
            img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
            axes[r, 2 * c + j].imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
        axes[r, 2 * c].set_title(f"{caption} {score:.3f}", fontsize=6, loc="left")
    return _save_figure(fig, path)


def _save_figure(fig, path: str) -> str:
    """Lay out `fig`, write it to the PNG `path` (creating its folder) and free it. Returns path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
