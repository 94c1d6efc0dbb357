"""Confidence bounds of error rates: exact Clopper-Pearson values (no TensorFlow)."""
import pytest

from siamese_core.error_rates import rate_interval_95, rate_upper_bound


def test_clopper_pearson_upper_bound():
    # k = 0: the exact one-sided bound is 1 - alpha^(1/n).
    assert rate_upper_bound(0, 1000) == pytest.approx(1 - 0.05 ** (1 / 1000), rel=1e-9)
    # No trials: no bound.
    assert rate_upper_bound(0, 0) is None
    # k = n: nothing to bound.
    assert rate_upper_bound(5, 5) == 1.0
    # Monotone in k and above the point estimate.
    assert 10 / 1000 < rate_upper_bound(10, 1000) < rate_upper_bound(11, 1000)
    # Known value: binomial(1000, u) has P(X <= 10) = 0.05 at the bound.
    from scipy.stats import binom
    u = rate_upper_bound(10, 1000)
    assert binom.cdf(10, 1000, u) == pytest.approx(0.05, abs=1e-9)


def test_clopper_pearson_interval():
    low, high = rate_interval_95(0, 1000)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 1000), rel=1e-6)
    low, high = rate_interval_95(5, 100)
    assert 0.01 < low < 0.05 < high < 0.12
