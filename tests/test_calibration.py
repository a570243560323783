"""Tests for anadp.calibration: the calibrated multiplier meets its target, errs
on the private side, and refuses bad arguments by name."""
import math

import pytest

from anadp.accounting import compute_epsilon, effective_noise_multiplier
from anadp.calibration import calibrate_noise_multiplier

DELTA = 1e-5
# Coarser PLD discretisation (pessimistic, ~10x faster) where many evaluations are needed.
FAST_PLD = 1e-3

@pytest.mark.parametrize("acc,ratio", [("pld", None), ("pld", 5.0), ("rdp", None), ("rdp", 0.7)])
def test_calibration_round_trip(acc, ratio):
    q, steps, target = 0.05, 60, 2.0
    kw = {"pld_discretization": FAST_PLD} if acc == "pld" else {}
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, accountant=acc,
                                       profile_noise_ratio=ratio, **kw)
    if ratio is None:
        z_eff = sigma
    else:
        z_eff = effective_noise_multiplier(sigma, [1.0], "elliptical",
                                           profile_noise_multiplier=ratio * sigma)
        assert z_eff == pytest.approx(sigma / math.sqrt(1.0 + ratio**-2), rel=1e-12)
        assert z_eff < sigma
    eps = compute_epsilon(z_eff, q, steps, DELTA, accountant=acc, **kw)
    assert abs(eps - target) < 1e-3
    assert eps <= target + 1e-9  # calibration errs on the private side


def test_calibration_large_target_needs_little_noise():
    # The bracket search must also go below 1.
    sigma = calibrate_noise_multiplier(50.0, DELTA, 0.1, 10, accountant="rdp")
    assert sigma < 1.0
    assert abs(compute_epsilon(sigma, 0.1, 10, DELTA, accountant="rdp") - 50.0) < 1e-3


@pytest.mark.parametrize("kwargs,match", [
    ({"target_epsilon": 0.0}, r"target_epsilon=0\.0 is outside \(0, inf\)"),
    ({"target_epsilon": -2}, r"target_epsilon=-2 is outside"),
    ({"delta": 1.0}, r"delta=1\.0 is outside \(0, 1\)"),
    ({"sampling_rate": -0.1}, r"sampling_rate=-0\.1 is outside \(0, 1\]"),
    ({"steps": -3}, r"steps=-3 must be an integer >= 1"),
    ({"accountant": "PLD"}, r"accountant='PLD' is not one of"),
    ({"profile_noise_ratio": 0.0}, r"profile_noise_ratio=0\.0 is outside \(0, inf\]"),
])
def test_calibration_validation(kwargs, match):
    args = {"target_epsilon": 1.0, "delta": 1e-5, "sampling_rate": 0.1, "steps": 10, "accountant": "rdp"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        calibrate_noise_multiplier(**args)
