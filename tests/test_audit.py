"""Tests for anadp.audit: the canary-run machinery on mechanisms whose leakage
is known (no noise, heavy noise, DP-SGD's Gaussian steps), and that the skewed
global-clipping variant is caught while elliptical clipping is not."""

import math

import numpy as np
import pytest

from anadp import allocation, audit
from anadp.audit_statistics import gaussian_dp_epsilon, gaussian_dp_mu_estimate

DELTA = 1e-5


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
    true_eps = gaussian_dp_epsilon(math.sqrt(steps) / sigma, DELTA)
    assert out.result.epsilon_lower_bound < 0.2
    assert out.result.epsilon_lower_bound <= true_eps


def test_elliptical_is_within_its_epsilon_and_global_is_caught():
    # Two full-batch steps, sigma = 2 sqrt(2): DP-SGD (and elliptical ANADP)
    # claim the epsilon of 0.5-GDP (about 2.1); the global variant's canary in
    # the least-noised group (s = 0.1) meets 5-GDP.
    sigma, steps = 2.0 * math.sqrt(2.0), 2
    scales = skewed_scales()
    claimed = gaussian_dp_epsilon(math.sqrt(steps) / sigma, DELTA)
    elliptical = audit.CanaryRun("elliptical", SIZES, scales, sigma, 1.0, steps=steps)
    literal = audit.CanaryRun("global", SIZES, scales, sigma, 1.0, steps=steps)
    e = audit.run_audit(elliptical, num_trials=2000, seed=2, delta=DELTA)
    g = audit.run_audit(literal, num_trials=2000, seed=3, delta=DELTA)
    # Each release shifts by mu = 1/z noise standard deviations (z the accounted
    # multiplier), and the scores through the real privatiser show exactly that.
    assert e.signal_per_step == pytest.approx(1 / sigma, rel=1e-5)
    assert g.signal_per_step == pytest.approx(1 / (sigma * min(scales)), rel=1e-5)
    assert gaussian_dp_mu_estimate(e.scores_out, e.scores_in) == pytest.approx(0.5, abs=0.1)
    assert gaussian_dp_mu_estimate(g.scores_out, g.scores_in) == pytest.approx(5.0, abs=0.3)
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
