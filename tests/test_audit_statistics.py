"""Tests for anadp.audit_statistics: the statistics that turn an auditor's
guesses into an epsilon lower bound, exactly."""

import math

import numpy as np
import pytest
import scipy.stats

from anadp import audit_statistics as audit

DELTA = 1e-5


@pytest.mark.parametrize("n", [1, 7, 100, 5000])
@pytest.mark.parametrize("alpha", [0.025, 0.05, 0.2])
def test_clopper_pearson_matches_scipy_beta_quantiles(n, alpha):
    k = np.unique(np.linspace(0, n, min(n + 1, 13)).astype(int))
    upper = audit.clopper_pearson_upper(k, n, alpha)
    lower = audit.clopper_pearson_lower(k, n, alpha)
    inner = k < n
    np.testing.assert_allclose(
        upper[inner], scipy.stats.beta.ppf(1 - alpha, k[inner] + 1, n - k[inner]), rtol=1e-9, atol=1e-14
    )
    assert np.all(upper[~inner] == 1.0)
    positive = k > 0
    np.testing.assert_allclose(
        lower[positive], scipy.stats.beta.ppf(alpha, k[positive], n - k[positive] + 1), rtol=1e-9, atol=1e-14
    )
    assert np.all(lower[~positive] == 0.0)
    # Two one-sided bounds at alpha are scipy's exact two-sided interval at 1 - 2 alpha.
    for kk, lo, hi in zip(k, lower, upper):
        ci = scipy.stats.binomtest(int(kk), n).proportion_ci(1 - 2 * alpha, method="exact")
        assert lo == pytest.approx(ci.low, rel=1e-9, abs=1e-14)
        assert hi == pytest.approx(ci.high, rel=1e-9, abs=1e-14)


def test_clopper_pearson_defining_property():
    # The upper bound p makes observing <= k successes exactly an alpha-probability event.
    n, alpha = 400, 0.05
    for k in (0, 3, 50, 399):
        p = float(audit.clopper_pearson_upper(k, n, alpha))
        assert scipy.stats.binom.cdf(k, n, p) == pytest.approx(alpha, rel=1e-8)
    with pytest.raises(ValueError, match="successes"):
        audit.clopper_pearson_upper(5, 4, 0.05)
    with pytest.raises(ValueError, match="alpha"):
        audit.clopper_pearson_upper(1, 4, 0.0)


def test_epsilon_from_error_rates():
    # A test with FPR = e^-eps (1 - FNR) is exactly on the eps-DP boundary.
    eps = 2.0
    fnr = 0.3
    fpr = math.exp(-eps) * (1 - fnr)
    assert audit.epsilon_from_error_rates(fpr, fnr, 0.0) == pytest.approx(eps)
    # Symmetric side, and delta is subtracted from the numerator.
    assert audit.epsilon_from_error_rates(fnr, fpr, 0.0) == pytest.approx(eps)
    assert audit.epsilon_from_error_rates(0.01, 0.5, 0.1) == pytest.approx(math.log(0.4 / 0.01))
    # A coin flip proves nothing; a perfect test proves everything.
    assert audit.epsilon_from_error_rates(0.5, 0.5, DELTA) == 0.0
    assert audit.epsilon_from_error_rates(0.0, 0.0, DELTA) == math.inf


def test_gaussian_dp_epsilon_matches_the_accountant():
    accounting = pytest.importorskip("anadp.accounting")
    # T full-batch Gaussian steps with multiplier sigma are sqrt(T)/sigma-GDP, exactly.
    sigma, steps = 4.0, 10
    pld = accounting.compute_epsilon(sigma, 1.0, steps, DELTA)
    gdp = audit.gaussian_dp_epsilon(math.sqrt(steps) / sigma, DELTA)
    assert gdp == pytest.approx(pld, rel=2e-3)
    assert gdp <= pld  # the PLD discretisation is pessimistic
    assert audit.gaussian_dp_epsilon(0.0, DELTA) == 0.0


def test_audit_scores_on_synthetic_gaussians():
    rng = np.random.default_rng(0)
    n = 20_000
    # Separated far beyond what n trials can certify: the bound sits at the ceiling.
    far = audit.audit_scores(rng.normal(0, 1, n), rng.normal(20, 1, n), delta=DELTA)
    assert far.false_positives == far.false_negatives == 0
    assert far.epsilon_lower_bound == pytest.approx(far.epsilon_ceiling)
    assert far.epsilon_ceiling == pytest.approx(math.log(n / 2 / math.log(40)), rel=0.01)
    # Indistinguishable: the bound is (almost) zero.
    same = audit.audit_scores(rng.normal(0, 1, n), rng.normal(0, 1, n), delta=DELTA)
    assert same.epsilon_lower_bound < 0.1
    # mu = 1 Gaussian-DP: a valid bound, below the true epsilon but well above 0.
    mid = audit.audit_scores(rng.normal(0, 1, n), rng.normal(1, 1, n), delta=DELTA)
    assert 0.5 < mid.epsilon_lower_bound < audit.gaussian_dp_epsilon(1.0, DELTA)
    with pytest.raises(ValueError, match="split"):
        audit.audit_scores([0.0], [1.0], delta=DELTA)


def test_attainable_bound_is_below_the_truth_and_grows_with_trials():
    eps = audit.gaussian_dp_epsilon(1.0, DELTA)
    small = audit.attainable_gaussian_bound(1.0, 1_000, delta=DELTA)
    large = audit.attainable_gaussian_bound(1.0, 100_000, delta=DELTA)
    assert 0 < small < large < eps
