"""Self-calibration: the match threshold chosen for the catalogue in hand, without labels.

A catalogue of N items is judged on M = N(N-1)/2 pairs, so a threshold must be set for M, not copied from a
card calibrated on a few hundred pairs. At match time:

1. Impostors: angular similarities of random pairs of the catalogue (every pair when M is small). Almost
   all of them are distinct items; the few duplicates among them sit at the top, where copies score.
2. Genuine: synthetic copies. Sampled catalogue items are read back from their files, edited by
   trainer.copy_edits (one edit family each, as in training), decoded to the model's input exactly as the
   embed stage decodes, and embedded by the same model; their similarity to their own template is what a
   duplicate of this catalogue scores under this model. Every other item also gets a second copy by
   another edit: two copies of one original are duplicates too, and score lower (reported as the expected
   recall of copy-to-copy pairs).
3. Tail model (peaks over threshold): every sampled pair above u, the 99.5th percentile, is modelled as a
   mixture of impostors, whose tail is a generalized Pareto distribution with shape xi >= 0 (no lighter
   than exponential: conservative), and duplicates, whose score density is that of the synthetic copies to
   their originals (a Gaussian kernel estimate), fitted by maximum likelihood. So the catalogue's own
   duplicates among the sampled pairs are explained, not mistaken for impostors. Copy-to-copy pairs are
   left out of the mixture on purpose: their density reaches down into the impostors' and, with a weight of
   its own, took impostors for duplicates (stated false pairs 0.34-0.63 of the truth on two
   catalogues, BENCHMARKS.md); without it a real copy-to-copy pair low in the band counts as an impostor,
   the conservative side. The fit gives the expected false pairs at any t >= u:
   FP(t) = M * share_impostors_above_u * S(t - u). Without synthetic copies, a
   GPD truncated below the 99.99th percentile is fitted instead (conservative).
   Where t is above every sampled impostor score, only the model speaks, and the result says so.
   With kNN score normalisation (beam_pipeline.knn_norm) every score here, sampled pairs, copies and counts
   alike, is the normalised one, so the threshold is a normalised score.
4. Predicted pairs P(t): counted exactly over all pairs (blocked matrix products; a seeded subsample of
   EXACT_COUNT_ITEMS items, scaled to M, when the catalogue is larger).
5. The threshold: the smallest t at which FP <= (1 - target_precision) * P holds there and over the next
   STABLE_STEPS grid points (default: expected precision 0.97), or FP(t) <= max_false_pairs. Its 95%
   interval comes from a bootstrap of the tail fit (sampled pairs and copies resampled).

Everything here is numpy in, numpy out, apart from `synthetic_copy_scores`, which reads image files and runs
the model. Similarities are angular (siamese_core.similarity).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize, stats

from beam_pipeline.thresholds import MAX_THRESHOLD, angular_cut, knn_cut
from siamese_core.similarity import all_pair_scores, angular_similarity, knn_normalised, upper_pair_blocks

MIN_ITEMS = 50                   # fewer items: too few pairs to estimate a tail (1,225 pairs at 50)
DEFAULT_TARGET_PRECISION = 0.97  # expected false pairs <= 3% of the predicted pairs
IMPOSTOR_SAMPLE_PAIRS = 2_000_000
EXACT_COUNT_ITEMS = 20_000
TAIL_QUANTILE = 0.995            # u: the fit starts at this quantile of the sampled pairs
MIN_BAND = 200                   # sampled pairs needed above u (and inside [u, c]) for a fit
# The truncated fit (when the mixture cannot be fitted): it stops at c, this quantile of the copies' scores,
# and [u, c] must span MIN_BAND_SPAN of [u, 1] (a shape to extrapolate).
GENUINE_CUT_QUANTILE = 0.01
MIN_BAND_SPAN = 0.25
GRID_STEP = 5e-4                 # thresholds are searched on this grid of angular similarity
STABLE_STEPS = 10                # the budget must hold over this many grid steps from the chosen one
BOOTSTRAP = 50
MAX_FIT_POINTS = 20_000          # the band is subsampled to this many points for the shape fit
BOOTSTRAP_FIT_POINTS = 5_000     # ... and to this many in each bootstrap refit
UNEXPLAINED_SLACK = (0.05, 10.0)  # (share of the predicted pairs, least pairs) the duplicates check tolerates
SOURCE = "self_calibrated"


class CalibrationError(ValueError):
    """The catalogue cannot be self-calibrated (too small, degenerate): pass a threshold instead."""


def sample_pair_scores(emb: np.ndarray, max_pairs: int, rng: np.random.Generator
                       ) -> tuple[np.ndarray, bool, tuple[np.ndarray, np.ndarray]]:
    """Angular similarities of random distinct pairs (i < j) of unit rows `emb` (n, d): every pair when
    n(n-1)/2 <= max_pairs (then the bool is True), else max_pairs pairs drawn uniformly with replacement.
    Returns (scores, exhaustive, (i, j): the rows of each pair, so the same pairs can be normalised)."""
    n = len(emb)
    total = n * (n - 1) // 2
    if total <= max_pairs:
        return all_pair_scores(emb)[1].astype(np.float64), True, np.triu_indices(n, 1)  # its order: row-major
    i = rng.integers(0, n, max_pairs)
    j = rng.integers(0, n - 1, max_pairs)
    j = j + (j >= i)  # uniform over j != i
    scores = np.empty(max_pairs, np.float64)
    for a in range(0, max_pairs, 1 << 20):  # a million pairs at a time: the gathered rows stay small
        part = slice(a, a + (1 << 20))
        scores[part] = angular_similarity(np.einsum("kd,kd->k", emb[i[part]], emb[j[part]]))
    return scores, False, (i, j)


def count_pairs_at_or_above(emb: np.ndarray, grid: np.ndarray, rng: np.random.Generator,
                            max_items: int = EXACT_COUNT_ITEMS, block: int = 2048, b: np.ndarray | None = None,
                            beta: float = 0.0) -> tuple[np.ndarray, bool]:
    """Pairs of the catalogue scoring >= each grid value (ascending grid): float (len(grid),). The score is
    the angular similarity, kNN-normalised when the rows' b is given. Exact over all pairs when n <=
    max_items (bool True); otherwise counted on a seeded subsample of max_items items and scaled by M / M_sub."""
    n = len(emb)
    scale = 1.0
    if n > max_items:
        rows = np.sort(rng.choice(n, max_items, replace=False))
        emb, scale = emb[rows], (n * (n - 1)) / (max_items * (max_items - 1))
        b = None if b is None else b[rows]
    lo = float(grid[0])
    hist = np.zeros(len(grid), np.int64)
    for _, sims, upper in upper_pair_blocks(emb, block, b, beta):
        sims = sims.astype(np.float64)
        values = sims[upper & (sims >= lo)]
        hist += np.bincount(np.searchsorted(grid, values, side="right") - 1, minlength=len(grid))[:len(grid)]
    at_or_above = np.cumsum(hist[::-1])[::-1].astype(np.float64)
    return at_or_above * scale, scale == 1.0


@dataclasses.dataclass
class TailModel:
    """Generalized Pareto tail of the impostor similarities, fitted on [u, c] (truncated likelihood).

    `share_above_u` is the share of all catalogue pairs that are impostors above u, inferred from the band
    count (n_band / n_sampled / F(c - u)), so duplicates above c do not inflate it."""

    u: float
    c: float
    xi: float
    sigma: float
    n_band: int
    n_sampled: int
    share_above_u: float
    method: str = "truncated"          # "mixture" (with synthetic copies) or "truncated" (without)
    duplicate_share: float | None = None  # mixture: share of all pairs that are duplicates above u

    def survival(self, t) -> np.ndarray:
        """Share of all pairs that are impostors with similarity >= t (t >= u)."""
        t = np.asarray(t, np.float64)
        tail = np.exp(gpd_log_survival(np.maximum(t - self.u, 0.0), self.xi, self.sigma))
        return self.share_above_u * np.where(t >= self.u, tail, 1.0)

    def to_json(self) -> dict:
        family = ("generalized Pareto above u, in a mixture with the score density of synthetic copies to "
                  "their originals, maximum likelihood" if self.method == "mixture"
                  else "generalized Pareto, truncated to [u, c], maximum likelihood")
        return {"family": family, "method": self.method, "duplicate_share_of_pairs": self.duplicate_share,
                "u": round(self.u, 6),
                "c": round(self.c, 6), "xi": round(self.xi, 5), "sigma": round(self.sigma, 6),
                "pairs_in_band": self.n_band, "pairs_sampled": self.n_sampled,
                "share_of_pairs_above_u": self.share_above_u}


def gpd_log_survival(x: np.ndarray, xi: float, sigma: float) -> np.ndarray:
    """log P(X >= x) of a generalized Pareto distribution (shape xi, scale sigma) at x >= 0; -inf beyond
    its end point when xi < 0."""
    x = np.asarray(x, np.float64)
    if abs(xi) < 1e-9:
        return -x / sigma
    z = 1.0 + xi * x / sigma
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(z > 0, -np.log(np.where(z > 0, z, 1.0)) / xi, -np.inf)


def _gpd_logpdf(x: np.ndarray, xi: float, sigma: float) -> np.ndarray:
    if abs(xi) < 1e-9:
        return -np.log(sigma) - x / sigma
    z = 1.0 + xi * x / sigma
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(z > 0, -np.log(sigma) - (1.0 / xi + 1.0) * np.log(np.where(z > 0, z, 1.0)), -np.inf)


def _truncated_gpd_fit(x: np.ndarray, width: float, start: tuple[float, float] | None = None) -> tuple[float, float]:
    """(xi, sigma) maximising the likelihood of exceedances x in [0, width] under a GPD truncated at width."""
    x = np.asarray(x, np.float64)
    n = len(x)
    mean = max(float(x.mean()), 1e-6)

    def nll(params):
        xi, log_sigma = params
        sigma = math.exp(log_sigma)
        logpdf = _gpd_logpdf(x, xi, sigma)
        mass = -math.expm1(float(gpd_log_survival(width, xi, sigma)))
        if mass <= 0 or not np.isfinite(logpdf).all():
            return 1e300
        return float(-(logpdf.sum() - n * math.log(mass)))

    starts = [start] if start is not None else [(-0.3, math.log(mean)), (0.1, math.log(mean))]
    best = None
    for x0 in starts:
        res = optimize.minimize(nll, x0=x0, method="Nelder-Mead",
                                options={"xatol": 1e-4, "fatol": 1e-4, "maxiter": 800})
        if best is None or res.fun < best.fun:
            best = res
    xi, log_sigma = best.x
    return float(xi), float(math.exp(log_sigma))


def _genuine_density(genuine: np.ndarray, u: float):
    """The synthetic copies' score density restricted to [u, 1] (a Gaussian KDE, Scott's bandwidth), as a
    function of scores; None if no copy scores at or above u."""
    genuine = np.asarray(genuine, np.float64)
    if np.ptp(genuine) < 1e-9:
        genuine = genuine + np.linspace(-1e-4, 1e-4, len(genuine))
    kde = stats.gaussian_kde(genuine)
    mass = float(kde.integrate_box_1d(u, np.inf))
    if mass <= 1e-9:
        return None
    return lambda x: kde(x) / mass


def _mixture_fit(y: np.ndarray, u: float, g_y: np.ndarray, start=None) -> tuple[float, float, float, list]:
    """(xi, sigma, impostor share pi, start for a refit) maximising sum log(pi GPD(y - u) + (1 - pi) g(y))
    over scores y >= u, g_y the duplicates' density there (evaluated at y); pi from a logit (softmax)."""
    x = y - u
    mean = max(float(x.mean()), 1e-6)
    g_y = np.asarray(g_y, np.float64)

    def weights(logits):
        z = np.concatenate([[0.0], logits])
        e = np.exp(z - z.max())
        return e / e.sum()  # [pi, 1 - pi]

    def nll(params):
        # xi >= 0: the tail is taken to be no lighter than exponential. A bounded tail (xi < 0) would let
        # the fit declare zero impostors above its end point and hand every pair there to the duplicates.
        xi, log_sigma, logits = max(params[0], 0.0), params[1], np.asarray(params[2:])
        w = weights(logits)
        f = w[0] * np.exp(_gpd_logpdf(x, xi, math.exp(log_sigma))) + w[1] * g_y
        return float(-np.sum(np.log(f + 1e-300)))

    starts = [start] if start is not None else [[-0.2, math.log(mean), -3.0], [0.1, math.log(mean), -1.0]]
    best = None
    for x0 in starts:
        res = optimize.minimize(nll, x0=np.asarray(x0, float), method="Nelder-Mead",
                                options={"xatol": 1e-4, "fatol": 1e-3, "maxiter": 1800})
        if best is None or res.fun < best.fun:
            best = res
    w = weights(best.x[2:])
    return max(float(best.x[0]), 0.0), float(math.exp(best.x[1])), float(w[0]), list(best.x)


def fit_mixture_tail(scores: np.ndarray, genuine: np.ndarray, rng: np.random.Generator | None = None,
                     start=None) -> tuple[TailModel, list] | None:
    """The impostor tail as one part of a mixture of all sampled pairs above u (TAIL_QUANTILE): impostors
    (a GPD) and duplicates (the score density of `genuine`, synthetic copies against their originals).
    Duplicates among the sampled pairs are thus explained, not mistaken for a heavy impostor tail, however far
    the copies' scores spread. Returns (model, the fit's parameters, to start a refit), or None when the copies
    give no density above u."""
    scores = np.asarray(scores, np.float64)
    u = float(np.quantile(scores, TAIL_QUANTILE))
    y = scores[scores >= u]
    density = _genuine_density(genuine, u)
    if density is None or len(y) < MIN_BAND or float(np.ptp(y)) < 1e-6:
        return None
    fit_on = y if len(y) <= MAX_FIT_POINTS else (rng or np.random.default_rng(0)).choice(y, MAX_FIT_POINTS, False)
    xi, sigma, pi, params = _mixture_fit(fit_on, u, density(fit_on), start)
    above = len(y) / len(scores)
    return TailModel(u, 1.0, xi, sigma, int(len(y)), int(len(scores)), above * pi, "mixture",
                     above * (1.0 - pi)), params


def fit_tail(scores: np.ndarray, genuine: np.ndarray | None) -> tuple[TailModel, list[str]]:
    """Fit the impostor tail of sampled pair scores (angular): the mixture fit with the synthetic copies'
    scores to their originals (`genuine`) when there are copies, else a GPD truncated below the copies (or,
    without copies, below the 99.99th percentile). Returns the model and notes on how it was fit (what was
    lowered or assumed)."""
    scores = np.asarray(scores, np.float64)
    notes = []
    if genuine is not None and len(genuine) >= 20:
        fitted = fit_mixture_tail(scores, genuine)
        if fitted is not None:
            return fitted[0], notes
        notes.append("the synthetic copies give no density above the fit's start: a truncated fit instead")
    c = float(np.quantile(genuine, GENUINE_CUT_QUANTILE)) if genuine is not None and len(genuine) else None
    if c is None:
        c = float(np.quantile(scores, 1 - 1e-4))
        notes.append("no synthetic copies: the fit stops at the 99.99th percentile of the sampled pairs, so "
                     "duplicates among them may inflate the estimate (conservative)")
    for q in (TAIL_QUANTILE, 0.95, 0.9, 0.8):
        u = float(np.quantile(scores, q))
        band = scores[(scores >= u) & (scores <= c)]
        if len(band) >= MIN_BAND and c - u >= MIN_BAND_SPAN * (1.0 - u):
            break
    else:
        u = float(np.quantile(scores, TAIL_QUANTILE))
        c = float(np.quantile(scores, 1 - 1e-4))
        band = scores[(scores >= u) & (scores <= c)]
        notes.append("synthetic copies and sampled pairs overlap: the fit runs up to the 99.99th percentile "
                     "of the sampled pairs and may include duplicates (conservative)")
    if q != TAIL_QUANTILE and not notes:
        notes.append(f"the fit starts at the {q:.0%} quantile of the sampled pairs (too few above the "
                     f"{TAIL_QUANTILE:.0%} one below the copies)")
    if len(band) < 20 or c - u <= 1e-6 or float(np.ptp(band)) < 1e-6:
        raise CalibrationError(
            f"the catalogue's sampled pairs have no tail to fit ({len(band)} pairs between {u:.4f} and "
            f"{c:.4f}): its items look alike to this model. Pass --threshold or --target_fmr")
    fit_on = band if len(band) <= MAX_FIT_POINTS else np.random.default_rng(0).choice(band, MAX_FIT_POINTS, False)
    xi, sigma = _truncated_gpd_fit(fit_on - u, c - u)
    mass = -math.expm1(float(gpd_log_survival(c - u, xi, sigma)))
    # Impostors above u cannot outnumber the sampled pairs above u (a band too narrow for its fit says so).
    share = min(len(band) / len(scores) / max(mass, 1e-12), float(np.mean(scores >= u)))
    return TailModel(u, c, xi, sigma, int(len(band)), int(len(scores)), float(share)), notes


def _bootstrap_tails(model: TailModel, scores: np.ndarray, rng: np.random.Generator, rounds: int,
                     genuine: np.ndarray | None = None) -> list[TailModel]:
    """Refits on resampled bands (count ~ Poisson(n_band), values resampled; for the mixture the copies are
    resampled too): the fit's uncertainty."""
    if model.method == "mixture":
        y = scores[scores >= model.u]
        out = []
        for _ in range(rounds):
            k = max(MIN_BAND, int(rng.poisson(len(y))))
            sample = rng.choice(y, min(k, BOOTSTRAP_FIT_POINTS), replace=True)
            density = _genuine_density(rng.choice(genuine, len(genuine)), model.u)
            if density is None:
                continue
            xi, sigma, pi, _ = _mixture_fit(sample, model.u, density(sample))
            above = k / model.n_sampled
            out.append(TailModel(model.u, 1.0, xi, sigma, k, model.n_sampled, above * pi, "mixture",
                                 above * (1 - pi)))
        return out
    band = scores[(scores >= model.u) & (scores <= model.c)]
    out = []
    for _ in range(rounds):
        k = max(20, int(rng.poisson(len(band))))
        # The shape is refit on at most MAX_FIT_POINTS resampled values; the count k carries the rest.
        sample = rng.choice(band, min(k, MAX_FIT_POINTS), replace=True)
        xi, sigma = _truncated_gpd_fit(sample - model.u, model.c - model.u, start=(model.xi, math.log(model.sigma)))
        mass = -math.expm1(float(gpd_log_survival(model.c - model.u, xi, sigma)))
        out.append(TailModel(model.u, model.c, xi, sigma, k, model.n_sampled, k / model.n_sampled / max(mass, 1e-12)))
    return out


def choose_threshold(impostor_scores: np.ndarray, n_items: int, grid: np.ndarray, predicted: np.ndarray,
                     genuine: np.ndarray | None, *, target_precision: float | None = DEFAULT_TARGET_PRECISION,
                     max_false_pairs: float | None = None, exhaustive: bool = False, exact_counts: bool = True,
                     seed: int = 0, bootstrap: int = BOOTSTRAP, copy_copy: np.ndarray | None = None,
                     knn: tuple[int, float] | None = None) -> dict:
    """The threshold for a false-pair budget, with its estimate and uncertainty.

    Args:
      impostor_scores: angular similarities of sampled pairs (sample_pair_scores).
      n_items: N; the catalogue has N(N-1)/2 pairs.
      grid, predicted: ascending thresholds and the catalogue's pairs at or above each (count_pairs_at_or_above).
      genuine: angular similarities of synthetic copies to their originals (or None): the duplicates of the
        tail mixture and the expected copy recall; copy_copy: of pairs of copies of one original by two
        edits (or None): their expected recall only.
      target_precision: budget FP(t) <= (1 - target_precision) * P(t); or max_false_pairs: FP(t) <= it.
      knn: (k, beta) when every score above is kNN-normalised (the threshold is then a normalised score).
    Returns the THRESHOLD dict of match_run.json (angular_similarity, cosine, source "self_calibrated") with
    a "self_calibration" entry: the estimate, its 95% interval, the counts and the tail model behind it.
    """
    if (target_precision is None) == (max_false_pairs is None):
        raise ValueError("give exactly one of target_precision and max_false_pairs")
    if target_precision is not None and not 0.0 < target_precision < 1.0:
        raise ValueError(f"target precision must lie in (0, 1), got {target_precision}")
    if max_false_pairs is not None and not max_false_pairs > 0:
        raise ValueError(f"max false pairs must be > 0, got {max_false_pairs}")
    total_pairs = n_items * (n_items - 1) // 2
    model, notes = fit_tail(impostor_scores, genuine)
    on_grid = grid >= model.u
    if not on_grid.any():
        raise CalibrationError(
            f"the catalogue's impostor tail starts at angular similarity {model.u:.5f}, above every threshold a run "
            f"may use (up to {grid[-1]:.4f}): to this model its items are too alike for copies to be told from "
            "distinct items. Pass --threshold")
    g, p = grid[on_grid], predicted[on_grid]
    fp = total_pairs * model.survival(g)
    if exact_counts:  # there cannot be more false pairs than pairs (the tail model can say so far out)
        fp = np.minimum(fp, p)
    budget = (1.0 - target_precision) * p if target_precision is not None else np.full(len(g), float(max_false_pairs))
    ok = (fp <= budget) | (p < 1) if target_precision is not None else fp <= budget
    # The truncated fit (no duplicates model) is checked against the copies' count; the mixture models them.
    unexplained = None if model.method == "mixture" else unexplained_pairs(g, p, fp, genuine,
                                                                             np.random.default_rng(seed + 1))
    if unexplained is not None:
        gated = ok & ~unexplained
        if np.any(ok & unexplained):
            lowest = float(g[np.flatnonzero(ok & unexplained)[-1]])
            notes.append(f"below {lowest:.4f} the catalogue has more pairs than its duplicates (scaled from the "
                         "synthetic copies) and the tail model explain together: the tail fit misses impostors "
                         "there (copies and distinct items overlap under this model), so those thresholds are "
                         "not used")
        ok = gated
    # The smallest t at which the budget holds there and at the next STABLE_STEPS grid points (one noisy
    # point does not choose). Higher up, where few pairs remain, the ratio may exceed the budget again: the
    # precision of a handful of pairs is not what a catalogue's threshold is chosen for.
    steady = np.array([ok[i:i + STABLE_STEPS].all() for i in range(len(ok))])
    hits = np.flatnonzero(steady & (p >= 1)) if target_precision is not None else np.flatnonzero(steady)
    if len(hits):
        k = int(hits[0])
    else:
        k = len(g) - 1
        notes.append("no threshold on the grid meets the budget: the highest one is used")
    t = float(g[k])
    fp_t, p_t = float(fp[k]), float(p[k])
    rng = np.random.default_rng(seed)
    boots = np.array([total_pairs * b.survival(t) for b in _bootstrap_tails(
        model, np.asarray(impostor_scores), rng, bootstrap, genuine)])
    boots = np.minimum(boots, p_t if exact_counts else total_pairs)
    lo, hi = (float(v) for v in np.quantile(boots, [0.025, 0.975])) if len(boots) else (fp_t, fp_t)
    sampled_above = int(np.sum(np.asarray(impostor_scores) >= t))
    beyond = sampled_above < 10
    if beyond:
        notes.append(f"t is beyond what sampling reaches ({sampled_above} sampled pairs at or above it): the "
                     "false-pair estimate there comes from the tail model alone")
    recall = None
    if genuine is not None and len(genuine):
        hits = int(np.sum(genuine >= t))
        ci = stats.binomtest(hits, len(genuine)).proportion_ci(0.95, method="exact")
        recall = {"estimate": hits / len(genuine), "ci95": [float(ci.low), float(ci.high)],
                  "synthetic_copies": int(len(genuine)),
                  "copy_to_copy": (round(float(np.mean(copy_copy >= t)), 4)
                                   if copy_copy is not None and len(copy_copy) else None)}
    budget_text = (f"expected false pairs <= {1 - target_precision:.3g} x predicted pairs (precision "
                   f">= {target_precision:g})" if target_precision is not None
                   else f"expected false pairs <= {max_false_pairs:g}")
    calibration = {
        "budget": budget_text,
        "target_precision": target_precision,
        "max_false_pairs": max_false_pairs,
        "catalogue_items": int(n_items),
        "catalogue_pairs": int(total_pairs),
        "predicted_pairs": p_t,
        "predicted_pairs_exact": bool(exact_counts),
        "expected_false_pairs": fp_t,
        "expected_false_pairs_ci95": [lo, hi],
        "expected_precision": (1.0 - fp_t / p_t) if p_t >= 1 else None,
        "expected_copy_recall": recall,
        "impostor_pairs_sampled": int(len(impostor_scores)),
        "impostor_sample_exhaustive": bool(exhaustive),
        "sampled_pairs_at_or_above": sampled_above,
        "beyond_sampling": beyond,
        "tail_model": model.to_json(),
        "notes": notes,
        "curve": _curve(g, p, fp),
    }
    cut = angular_cut(t) if knn is None else knn_cut(t, *knn)
    return {**cut, "source": SOURCE, "target_fmr": None, "impostor_pairs": int(len(impostor_scores)),
            "self_calibration": calibration}


def unexplained_pairs(grid: np.ndarray, predicted: np.ndarray, fp: np.ndarray, genuine: np.ndarray | None,
                      rng: np.random.Generator, rounds: int = 200) -> np.ndarray | None:
    """Where the catalogue holds clearly more pairs than duplicates and modelled impostors explain (bool per
    grid point), a check of the tail model against a second, model-free view of the same counts.

    Duplicates: D = P(m) / S_gen(m) pairs, m the median synthetic copy score (half the copies score above
    it); at t they contribute D * S_gen(t). Excess = P(t) - D * S_gen(t) - FP(t) is flagged when it exceeds
    UNEXPLAINED_SLACK (5% of P(t), at least 10 pairs) plus three standard deviations of D * S_gen(t) (copies
    resampled, plus Poisson counting noise). None without copies."""
    if genuine is None or len(genuine) < 20:
        return None
    genuine = np.sort(np.asarray(genuine, np.float64))

    def explained(sample):
        median = float(np.median(sample))
        at_median = float(np.interp(median, grid, predicted)) if median >= grid[0] else float(predicted[0])
        survival = 1.0 - np.searchsorted(np.sort(sample), grid, side="left") / len(sample)
        return at_median / 0.5 * survival

    base = explained(genuine)
    spread = np.std([explained(rng.choice(genuine, len(genuine))) for _ in range(rounds)], axis=0)
    spread = np.sqrt(spread ** 2 + base + 1.0)
    excess = predicted - base - fp
    share, floor = UNEXPLAINED_SLACK
    return excess > np.maximum(share * predicted, floor) + 3.0 * spread


def _curve(grid: np.ndarray, predicted: np.ndarray, fp: np.ndarray, points: int = 60) -> list[dict]:
    """A thinned copy of the sweep behind the choice (for the report's plot)."""
    idx = np.unique(np.linspace(0, len(grid) - 1, min(points, len(grid))).astype(int))
    return [{"threshold": round(float(grid[i]), 6), "predicted_pairs": float(predicted[i]),
             "expected_false_pairs": float(fp[i])} for i in idx]


def threshold_grid(low: float = 0.5, high: float = MAX_THRESHOLD) -> np.ndarray:
    """Ascending thresholds from `low` to `high` in GRID_STEP steps. The default `high` is the highest
    angular threshold a run may use (thresholds.MAX_THRESHOLD): above it, float32 embeddings of identical
    content may not match, so a catalogue where no threshold meets the budget falls back to it, not to 1."""
    grid = np.round(np.arange(low, high + GRID_STEP / 2, GRID_STEP), 6)
    return grid[grid <= high]


def synthetic_copy_scores(model, input_spec: dict, items: list[tuple], rng: np.random.Generator,
                          *, edits: str = "copy", mirror: bool = True, max_side: int = 512,
                          knn=None) -> tuple[np.ndarray, list[str], dict]:
    """Scores of synthetic copies against their own templates, made by the edits the model was trained
    with (its card's training.edits): angular similarities, or kNN-normalised scores with `knn`
    (beam_pipeline.knn_norm.KnnScores: a copy's b is its k-th neighbour among the catalogue's items).

    items: (image bytes, template embedding (d,), the item's b or None) of sampled catalogue items. edits
    "copy": each is decoded (at most `max_side` px), edited by one family of trainer.copy_edits (cycled),
    saved as JPEG and decoded to the input spec as the embed stage does; "near_duplicate": decoded to the
    input spec and edited there by trainer.augment. Then embedded. Returns (scores (k,), families (k,), {reason: count} of items skipped
    because their bytes do not decode, copy-to-copy scores (m,): every other item's copy against a second
    copy of it by another edit; empty for near_duplicate))."""
    if edits == "near_duplicate":
        return _near_duplicate_scores(model, input_spec, items, rng, knn)
    import io

    from PIL import Image

    from siamese_core.decode import DecodeError, decode_image
    from trainer.copy_edits import CopyPlanter, choose_families

    planter = CopyPlanter()
    families = choose_families(len(items), rng, mirror=mirror)
    second = choose_families(len(items), rng, mirror=mirror)
    pixels, originals, originals_b, used, skipped, pairs = [], [], [], [], {}, []

    def copy_pixels(image, family):
        buffer = io.BytesIO()
        Image.fromarray(planter(image, family, rng)).save(buffer, format="JPEG", quality=92)
        return decode_image(buffer.getvalue(), input_spec).pixels

    for k, ((data, emb, b), family) in enumerate(zip(items, families)):
        try:
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", (max_side, max_side))
            image = np.asarray(image.convert("RGB"))
            if max(image.shape[:2]) > max_side:
                pil = Image.fromarray(image)
                pil.thumbnail((max_side, max_side))
                image = np.asarray(pil)
            first = copy_pixels(image, family)
            # Every other item also gets a second copy by another edit: copies of one original are
            # duplicates of each other too, and score lower than copy-original pairs.
            other = copy_pixels(image, second[k] if second[k] != family else families[k - 1]) if k % 2 else None
        except (DecodeError, OSError, ValueError) as err:
            reason = type(err).__name__
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        pixels.append(first)
        originals.append(emb)
        originals_b.append(b)
        used.append(family)
        if other is not None:
            pairs.append((len(pixels) - 1, other))
    if not pixels:
        return np.zeros(0), [], skipped, np.zeros(0)
    scores, copies, copies_b = _scores(model, input_spec, pixels, originals, originals_b, knn)
    copy_copy = np.zeros(0)
    if pairs:
        firsts = [i for i, _ in pairs]
        seconds = _embed(model, input_spec, [x for _, x in pairs])
        copy_copy = angular_similarity(np.einsum("kd,kd->k", copies[firsts], seconds)).astype(np.float64)
        if knn is not None:
            copy_copy = knn_normalised(copy_copy, copies_b[firsts], knn.b_of(seconds), knn.beta).astype(np.float64)
    return scores, used, skipped, copy_copy


def _embed(model, input_spec: dict, pixels: list) -> np.ndarray:
    from beam_pipeline.inference import embed_batch
    return np.concatenate([embed_batch(model, pixels[k:k + 256], input_spec) for k in range(0, len(pixels), 256)])


def _scores(model, input_spec: dict, pixels: list, originals: list, originals_b: list,
            knn=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(scores of the copies `pixels` against their originals' embeddings, the copies' embeddings, their b):
    angular similarities, or with `knn` (knn_norm.KnnScores) kNN-normalised by the originals' b
    (`originals_b`) and the copies' own (None without knn)."""
    copies = _embed(model, input_spec, pixels)
    scores = angular_similarity(np.einsum("kd,kd->k", copies, np.asarray(originals, np.float32)))
    if knn is None:
        return scores.astype(np.float64), copies, None
    copies_b = knn.b_of(copies)
    scores = knn_normalised(scores, np.asarray(originals_b, np.float32), copies_b, knn.beta)
    return scores.astype(np.float64), copies, copies_b


def _near_duplicate_scores(model, input_spec: dict, items: list, rng: np.random.Generator, knn=None):
    """synthetic_copy_scores for encoders trained with trainer.augment (e.g. Fashion-MNIST)."""
    from siamese_core.decode import DecodeError, decode_image
    from trainer.augment import augment_image
    pixels, originals, originals_b, skipped = [], [], [], {}
    for data, emb, b in items:
        try:
            decoded = decode_image(data, input_spec).pixels
        except DecodeError as err:
            skipped[type(err).__name__] = skipped.get(type(err).__name__, 0) + 1
            continue
        pixels.append(augment_image(decoded, rng))
        originals.append(emb)
        originals_b.append(b)
    if not pixels:
        return np.zeros(0), [], skipped, np.zeros(0)
    scores = _scores(model, input_spec, pixels, originals, originals_b, knn)[0]
    return scores, ["near_duplicate"] * len(pixels), skipped, np.zeros(0)


def _read_bytes(uri: str, max_bytes: int) -> bytes:
    """The bytes of a catalogue file (local or gs://); shard members (uri with '#') are not readable alone."""
    if "#" in uri:
        raise OSError("a shard member: its file cannot be read on its own")
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.open(uri) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"larger than {max_bytes} bytes")
    return data


def calibrate_catalogue(manifest, templates_glob: str, model_dir: str, *, target_precision: float | None,
                        max_false_pairs: float | None, copies: int = 400, max_pairs: int = IMPOSTOR_SAMPLE_PAIRS,
                        seed: int = 0, max_file_bytes: int = 64 << 20, log=None, knn=None) -> dict:
    """Self-calibrate the staged catalogue `manifest` (beam_pipeline.blocks) for a false-pair budget.

    Reads a seeded subsample of at most EXACT_COUNT_ITEMS templates, samples pairs of them, makes `copies`
    synthetic copies of sampled items from their source files with the model at `model_dir`, counts the
    catalogue's pairs per threshold and calls `choose_threshold`. With `knn` (beam_pipeline.knn_norm.KnnScores
    of this manifest) every score is kNN-normalised: sampled pairs, counts and copies alike, so the threshold
    is a normalised score. Raises CalibrationError (with what to do
    instead) when the catalogue is too small or degenerate."""
    from beam_pipeline import blocks as bk
    from siamese_core.artefact import load_encoder

    n = manifest.n
    if n < MIN_ITEMS:
        raise CalibrationError(
            f"the catalogue has {n} items; self-calibration needs at least {MIN_ITEMS} (their random pairs are "
            "its impostor sample). Pass --threshold (angular similarity) or --target_fmr (the model card's "
            "calibration)")
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if n <= EXACT_COUNT_ITEMS else np.sort(rng.choice(n, EXACT_COUNT_ITEMS, replace=False))
    ids, emb = bk.read_rows(manifest, rows)
    b = None if knn is None else knn.b[rows]
    beta = 0.0 if knn is None else knn.beta
    impostor, exhaustive, (left, right) = sample_pair_scores(emb, max_pairs, rng)
    if float(np.quantile(impostor, 0.5)) >= 0.999:
        raise CalibrationError(
            "half of the catalogue's random pairs are at angular similarity >= 0.999: its items are (nearly) "
            "identical to this model, so copies cannot be told from distinct items. Pass --threshold")
    if knn is not None:  # the same pairs, scored as the matches will be
        impostor = knn_normalised(impostor, b[left], b[right], beta).astype(np.float64)
    # kNN-normalised scores are no cosines: float32's resolution near 1 does not cap them.
    grid = threshold_grid(max(0.0, float(np.quantile(impostor, 0.5))), MAX_THRESHOLD if knn is None else 1.0)
    if exhaustive and len(rows) == n:  # the sample is every pair: count from it, not from a second pass
        predicted = (len(impostor) - np.searchsorted(np.sort(impostor), grid, side="left")).astype(np.float64)
        exact = True
    else:
        predicted, exact = count_pairs_at_or_above(emb, grid, rng, b=b, beta=beta)
    uris = _source_uris(templates_glob)
    genuine, families, skipped, copy_copy = np.zeros(0), [], {}, np.zeros(0)
    model, card = None, None
    if copies > 0:
        model, card = load_encoder(model_dir)
        picks = rng.permutation(len(ids))
        items = []
        for k in picks:
            if len(items) >= copies:
                break
            try:
                items.append((_read_bytes(uris[ids[k]], max_file_bytes), emb[k], None if b is None else b[k]))
            except (OSError, KeyError) as err:
                reason = f"unreadable ({type(err).__name__})"
                skipped[reason] = skipped.get(reason, 0) + 1
        training = (card or {}).get("training") or {}
        if items:
            genuine, families, bad, copy_copy = synthetic_copy_scores(
                model, card["input_spec"], items, rng, edits=training.get("edits", "near_duplicate"),
                mirror=bool(training.get("mirror", True)), knn=knn)
            for reason, count in bad.items():
                skipped[reason] = skipped.get(reason, 0) + count
    result = choose_threshold(impostor, n, grid, predicted, genuine if len(genuine) else None,
                              target_precision=target_precision, max_false_pairs=max_false_pairs,
                              exhaustive=exhaustive and len(rows) == n, exact_counts=exact, seed=seed,
                              copy_copy=copy_copy if len(copy_copy) else None,
                              knn=None if knn is None else (knn.k, knn.beta))
    cal = result["self_calibration"]
    by_family = {}
    for f in sorted(set(families)):
        sel = np.asarray([x == f for x in families])
        by_family[f] = round(float(np.mean(genuine[sel] >= result["value"])), 4)
    cal["synthetic_copies"] = {"made": int(len(genuine)), "skipped": skipped, "recall_by_family": by_family,
                               "median_score": float(np.median(genuine)) if len(genuine) else None}
    if len(genuine) == 0:
        cal["notes"].append("no synthetic copies could be made (source files unreadable or copies off): the "
                            "expected copy recall is unknown")
    if log is not None:
        lo, hi = cal["expected_false_pairs_ci95"]
        log(f"self-calibrated threshold {result['value']:.4f} ({result['score']}): {cal['budget']}; "
            f"~{cal['predicted_pairs']:.0f} predicted pairs, expected false pairs {cal['expected_false_pairs']:.2f} "
            f"(95% {lo:.2f}-{hi:.2f}) of {cal['catalogue_pairs']} pairs; copy recall "
            f"{(cal['expected_copy_recall'] or {}).get('estimate')}")
    return result


def _source_uris(templates_glob: str) -> dict:
    """item_id -> source_uri of the templates."""
    from beam_pipeline import blocks as bk
    out = {}
    for _, batch in bk.iter_parquet_batches(templates_glob, ["item_id", "source_uri"]):
        out.update(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()))
    return out
