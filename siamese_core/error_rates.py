"""Error rates of a threshold and how sure we are of them: the one home of the confidence bounds that the
trainer's card calibration and the pipelines' reports state.

A rate here is k events (false matches, planted pairs matched, ...) seen in n trials (impostor pairs,
planted pairs, ...). Intervals are exact (Clopper-Pearson, from the beta distribution), so they hold at
the counts a catalogue really has, including k = 0.
"""
from __future__ import annotations

# A threshold for a target FMR is claimed only when at least RULE_OF_THREE / target impostor pairs were
# scored: with none of n pairs matched, the 95% upper bound of the FMR is about 3 / n.
RULE_OF_THREE = 3.0


def rate_upper_bound(k: int, n: int, confidence: float = 0.95) -> float | None:
    """One-sided exact (Clopper-Pearson) upper confidence bound of a rate seen as k events in n trials;
    1.0 when k >= n, None without trials (n <= 0)."""
    k, n = int(k), int(n)
    if n <= 0:
        return None
    if k >= n:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, k + 1, n - k))


def rate_interval_95(k: int, n: int) -> tuple[float, float]:
    """Exact two-sided 95% interval (Clopper-Pearson) of a rate seen as k events in n trials; (0, 1) without
    trials."""
    from scipy.stats import beta

    if n <= 0:
        return 0.0, 1.0
    low = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    high = 1.0 if k >= n else float(beta.ppf(0.975, k + 1, n - k))
    return low, high
