"""Calibration: the smallest noise multiplier that meets a target epsilon (host side; no JAX).

The run is ``steps`` Poisson-sampled Gaussian steps, add-or-remove-one
neighbours, accounted as in :mod:`anadp.accounting`; the search is
``dp_accounting.calibrate_dp_mechanism`` on an explicit bracket. A run's
mechanism calibrates itself with ``noise.Mechanism.calibrated``, which passes
its profile release's ratio (``private_profile``) here.
"""
from __future__ import annotations

import math

import dp_accounting

from anadp import _checks, accounting

__all__ = ["calibrate_noise_multiplier"]


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                               accountant: str = "pld", profile_noise_ratio: float | None = None, *,
                               pld_discretization: float = accounting.DEFAULT_PLD_DISCRETIZATION,
                               tol: float = 1e-7) -> float:
    """Smallest gradient noise multiplier ``sigma`` meeting ``(target_epsilon, delta)``.

    The run is ``steps`` Poisson-sampled (rate ``sampling_rate``) Gaussian
    steps, add-or-remove-one neighbours, as in :func:`anadp.accounting.compute_epsilon`. The
    search is ``dp_accounting.calibrate_dp_mechanism`` (Brent's method) on an
    explicit bracket found here, with tolerance ``tol`` on the multiplier; the
    returned multiplier's epsilon is at most ``target_epsilon``.

    With ``profile_noise_ratio=r`` (the ``private_profile`` estimator releases
    a K-vector with multiplier ``sigma_u = r * sigma`` from the same sample),
    the step's multiplier is ``z_eff = sigma / sqrt(1 + r^-2)``; calibration
    solves for ``z_eff`` and returns ``sigma`` (the gradient's multiplier).
    """
    eps = _checks.in_interval("target_epsilon", target_epsilon, "(0, inf)", note=": it must be positive and finite")
    d = _checks.delta(delta)
    q = _checks.sampling_rate(sampling_rate)
    t = _checks.integer("steps", steps, 1)
    acc = _checks.one_of("accountant", accountant, accounting.ACCOUNTANTS)
    disc = _checks.in_interval("pld_discretization", pld_discretization, "(0, inf)")
    tol = _checks.real("tol", tol)
    if not tol > 0.0:
        raise ValueError(f"tol={tol!r} is outside (0, inf)")
    ratio = None
    if profile_noise_ratio is not None:
        ratio = _checks.real("profile_noise_ratio", profile_noise_ratio)
        if not ratio > 0.0:
            raise ValueError(f"profile_noise_ratio={profile_noise_ratio!r} is outside (0, inf]")

    def gap(z: float) -> float:
        return accounting.epsilon_of_event(accounting.make_step_event(z, q, t), d, acc, disc) - eps

    # Explicit bracket [lo, hi] with gap(lo) > 0 >= gap(hi), found by
    # doubling / halving from z = 1 (epsilon decreases in z).
    lo = hi = 1.0
    if gap(1.0) > 0.0:
        for _ in range(60):
            lo, hi = hi, hi * 2.0
            if gap(hi) <= 0.0:
                break
        else:
            raise ValueError(
                f"target_epsilon={target_epsilon!r} is unreachable: no noise multiplier up to {hi:g} "
                f"meets it at delta={delta!r}, sampling_rate={sampling_rate!r}, steps={steps!r}")
    else:
        for _ in range(60):
            lo, hi = lo / 2.0, lo
            if gap(lo) > 0.0:
                break
        else:
            raise ValueError(
                f"target_epsilon={target_epsilon!r} is met by every noise multiplier down to {lo:g}; "
                "calibration is meaningless at this setting")

    z_eff = float(dp_accounting.calibrate_dp_mechanism(
        lambda: accounting.make_accountant(acc, disc),
        lambda z: accounting.make_step_event(z, q, t),
        eps, d,
        bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi),
        tol=tol,
    ))
    if ratio is None:
        return z_eff
    sigma = z_eff * math.sqrt(1.0 + ratio ** -2)
    # Guard against rounding: the effective multiplier recomputed from the
    # returned sigma must not fall below the calibrated one.
    while accounting.combine_noise_multipliers(sigma, ratio * sigma) < z_eff:
        sigma = math.nextafter(sigma, math.inf)
    return sigma
