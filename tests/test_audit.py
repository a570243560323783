"""Tests for anadp.audit: the statistics exactly, the canary-run machinery on
mechanisms whose leakage is known (no noise, heavy noise, DP-SGD's Gaussian
steps), and that the skewed global-clipping variant is caught while elliptical
clipping is not."""

import math

import numpy as np
import pytest
import scipy.stats

from anadp import allocation, audit

DELTA = 1e-5


# --- statistics -------------------------------------------------------------------


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


# --- the canary run through anadp.privatize ------------------------------------------

SIZES = (50, 2)


def skewed_scales():
    s = allocation.noise_scales(np.array([1.0, 10.0]), np.array(SIZES), gamma=1.0, rho=10.0)
    return tuple(float(x) for x in np.asarray(s))


def test_skewed_allocation_is_normalised():
    s = np.array(skewed_scales())
    assert np.sum(np.array(SIZES) * s**2) == pytest.approx(sum(SIZES), rel=1e-5)
    assert s[1] / s[0] == pytest.approx(0.1, rel=1e-5)


def test_no_noise_gives_the_largest_certifiable_bound():
    run = audit.CanaryRun("global", SIZES, None, 0.0, 1.0, steps=2)
    out = audit.run_audit(run, num_trials=2000, seed=0, delta=DELTA)
    assert out.result.false_positives == out.result.false_negatives == 0
    assert out.result.epsilon_lower_bound == pytest.approx(out.result.epsilon_ceiling)
    assert out.result.epsilon_lower_bound > 5.0


def test_heavy_noise_gives_a_bound_near_zero_and_below_the_truth():
    sigma, steps = 100.0, 2
    run = audit.CanaryRun("global", SIZES, None, sigma, 1.0, steps=steps)
    out = audit.run_audit(run, num_trials=1000, seed=0, delta=DELTA)
    true_eps = audit.gaussian_dp_epsilon(math.sqrt(steps) / sigma, DELTA)
    assert out.result.epsilon_lower_bound < 0.2
    assert out.result.epsilon_lower_bound <= true_eps


def test_elliptical_is_within_its_epsilon_and_global_is_caught():
    # Two full-batch steps, sigma = 2 sqrt(2): DP-SGD (and elliptical ANADP)
    # claim the epsilon of 0.5-GDP (about 2.1); the global variant's canary in
    # the least-noised group (s = 0.1) meets 5-GDP.
    sigma, steps = 2.0 * math.sqrt(2.0), 2
    scales = skewed_scales()
    claimed = audit.gaussian_dp_epsilon(math.sqrt(steps) / sigma, DELTA)
    elliptical = audit.CanaryRun("elliptical", SIZES, scales, sigma, 1.0, steps=steps)
    literal = audit.CanaryRun("global", SIZES, scales, sigma, 1.0, steps=steps)
    e = audit.run_audit(elliptical, num_trials=2000, seed=2, delta=DELTA)
    g = audit.run_audit(literal, num_trials=2000, seed=3, delta=DELTA)
    # Each release shifts by mu = 1/z noise standard deviations (z the accounted
    # multiplier), and the scores through the real privatiser show exactly that.
    assert e.signal_per_step == pytest.approx(1 / sigma, rel=1e-5)
    assert g.signal_per_step == pytest.approx(1 / (sigma * min(scales)), rel=1e-5)
    assert audit.gaussian_dp_mu_estimate(e.scores_out, e.scores_in) == pytest.approx(0.5, abs=0.1)
    assert audit.gaussian_dp_mu_estimate(g.scores_out, g.scores_in) == pytest.approx(5.0, abs=0.3)
    assert e.result.epsilon_lower_bound <= claimed
    assert g.result.epsilon_lower_bound > claimed + 2.0


def test_poisson_sampled_canary_audit_is_valid():
    # q < 1: the canary is in each step's batch with probability q.
    accounting = pytest.importorskip("anadp.accounting")
    sigma, q, steps = 0.5, 0.2, 2
    run = audit.CanaryRun("elliptical", SIZES, skewed_scales(), sigma, q, steps=steps)
    out = audit.run_audit(run, num_trials=1000, seed=4, delta=DELTA)
    assert out.result.epsilon_lower_bound <= accounting.compute_epsilon(sigma, q, steps, DELTA)


def test_canary_run_validates_its_arguments():
    with pytest.raises(ValueError, match="clipping"):
        audit.CanaryRun("ellipse", SIZES, None, 1.0, 1.0, 1)
    with pytest.raises(ValueError, match="group_scales"):
        audit.CanaryRun("global", SIZES, (1.0,), 1.0, 1.0, 1)
    with pytest.raises(ValueError, match="sampling_rate"):
        audit.CanaryRun("global", SIZES, None, 1.0, 0.0, 1)
    with pytest.raises(ValueError, match="canary_norm"):
        audit.CanaryRun("global", SIZES, None, 1.0, 1.0, 1, canary_norm=0.0)


def test_attainable_bound_is_below_the_truth_and_grows_with_trials():
    eps = audit.gaussian_dp_epsilon(1.0, DELTA)
    small = audit.attainable_gaussian_bound(1.0, 1_000, delta=DELTA)
    large = audit.attainable_gaussian_bound(1.0, 100_000, delta=DELTA)
    assert 0 < small < large < eps
