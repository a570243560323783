"""Tests for anadp.accounting: epsilon, effective multipliers, the ledger (calibration: test_calibration.py)."""
import itertools
import json
import math
import re

import dp_accounting
import numpy as np
import pytest

from anadp import accounting
from anadp.accounting import (
    PrivacyLedger,
    check_delta,
    compute_epsilon,
    default_delta,
    effective_noise_multiplier,
)

DELTA = 1e-5
# Coarser PLD discretisation (pessimistic, ~10x faster) where many evaluations are needed.
FAST_PLD = 1e-3


def _direct_epsilon(acc, z, q, steps, delta, **kw):
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if acc == "pld":
        a = dp_accounting.pld.PLDAccountant(neighboring_relation=relation, **kw)
    else:
        a = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return a.compose(event).get_epsilon(delta)


def _allocation(d, a):
    """METHOD.md's normalisation: s = a * sqrt(sum d / sum d a^2), so sum d s^2 = sum d."""
    d = np.asarray(d, np.float64)
    a = np.asarray(a, np.float64)
    return a * np.sqrt(d.sum() / (d * a**2).sum())


# --------------------------------------------------------------------------
# compute_epsilon
# --------------------------------------------------------------------------

@pytest.mark.parametrize("acc,z,q,steps,kw", [
    ("pld", 1.1, 0.05, 100, {}),
    ("pld", 0.9, 0.01, 300, {"value_discretization_interval": FAST_PLD}),
    ("rdp", 1.1, 0.05, 100, {}),
    ("rdp", 0.9, 0.01, 300, {}),
    ("rdp", 2.0, 1.0, 10, {}),
])
def test_compute_epsilon_matches_dp_accounting(acc, z, q, steps, kw):
    if acc == "pld" and not kw:
        ours = compute_epsilon(z, q, steps, DELTA)  # PLD is the default
    elif acc == "pld":
        ours = compute_epsilon(z, q, steps, DELTA, accountant="pld",
                               pld_discretization=kw["value_discretization_interval"])
    else:
        ours = compute_epsilon(z, q, steps, DELTA, accountant=acc)
    assert ours == _direct_epsilon(acc, z, q, steps, DELTA, **kw)
    assert 0.0 < ours < math.inf


def test_compute_epsilon_zero_noise_is_inf():
    assert compute_epsilon(0.0, 0.1, 10, DELTA) == math.inf
    assert compute_epsilon(0, 0.1, 10, DELTA, accountant="rdp") == math.inf


def test_compute_epsilon_decreases_with_noise():
    eps = [compute_epsilon(z, 0.05, 50, DELTA, accountant="rdp") for z in (0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in itertools.pairwise(eps))


# --------------------------------------------------------------------------
# effective_noise_multiplier
# --------------------------------------------------------------------------

D = [768 * 768, 768, 8 * 768, 768 * 8, 3072 * 768]
A = [0.5, 1.0, 2.0, 1.5, 0.8]


def test_elliptical_is_sigma_for_any_scales():
    s = _allocation(D, A)
    for scales in (s, [1.0], {"a": s[:2], "b": [s[2], {"c": s[3:]}]}, np.full(7, 3.0)):
        assert effective_noise_multiplier(1.3, scales, "elliptical") == 1.3


def test_global_is_sigma_times_min_scale():
    s = _allocation(D, A)
    assert np.sum(np.asarray(D) * s**2) == pytest.approx(np.sum(D), rel=1e-12)
    z = effective_noise_multiplier(1.3, s, "global")
    assert z == pytest.approx(1.3 * s.min(), rel=1e-12)
    assert z < 1.3
    # nested pytree of per-group scalars gives the same answer
    tree = {"layer0": {"w": s[0], "b": s[1]}, "layer1": (s[2], [s[3], np.asarray(s[4])])}
    assert effective_noise_multiplier(1.3, tree, "global") == z
    # uniform allocation is DP-SGD
    assert effective_noise_multiplier(1.3, np.ones(5), "global") == pytest.approx(1.3)


def test_effective_multiplier_with_profile():
    s = _allocation(D, A)
    su = 5.0 * 1.3
    ell = effective_noise_multiplier(1.3, s, "elliptical", profile_noise_multiplier=su)
    glo = effective_noise_multiplier(1.3, s, "global", profile_noise_multiplier=su)
    assert ell == pytest.approx((1.3**-2 + su**-2) ** -0.5, rel=1e-12)
    assert glo == pytest.approx(((1.3 * s.min()) ** -2 + su**-2) ** -0.5, rel=1e-12)
    assert glo < ell < 1.3
    assert effective_noise_multiplier(1.3, s, "elliptical", profile_noise_multiplier=0.0) == 0.0


# --------------------------------------------------------------------------
# PrivacyLedger
# --------------------------------------------------------------------------

def test_empty_ledger():
    ledger = PrivacyLedger()
    assert ledger.steps == 0
    assert ledger.epsilon(DELTA) == 0.0
    assert isinstance(ledger.dp_event(), dp_accounting.ComposedDpEvent)


def test_ledger_constant_sigma_equals_compute_epsilon():
    q, z, steps = 0.05, 1.1, 120
    ledger = PrivacyLedger()  # PLD, default grid and discretisation
    for _ in range(steps):
        ledger.record(q, z)
    assert ledger.steps == steps
    assert ledger.entries == [(q, z, steps)]  # run-length compressed, value exact
    assert ledger.epsilon(DELTA) == compute_epsilon(z, q, steps, DELTA)
    # a calibrated (arbitrary float) sigma is recorded exactly too
    sigma = 0.8734512345
    led = PrivacyLedger(accountant="rdp")
    led.record(q, sigma, count=40)
    for _ in range(60):
        led.record(q, sigma)
    assert led.entries == [(q, sigma, 100)]
    assert led.epsilon(DELTA) == compute_epsilon(sigma, q, 100, DELTA, accountant="rdp")


def _global_multipliers(sigma, steps, warmup=5, seed=0, drift=0.05):
    """Effective multipliers of a global-clipping run whose allocation drifts every step."""
    rng = np.random.default_rng(seed)
    a = np.asarray(A)
    out = []
    for t in range(steps):
        if t < warmup:
            s = np.ones(len(D))
        else:
            a = np.clip(a * np.exp(drift * rng.standard_normal(len(a))), 0.5, 2.0)
            s = _allocation(D, a)
        out.append(effective_noise_multiplier(sigma, s, "global"))
    return out


def _global_run(ledger, sigma, q, steps, drift=0.05):
    for z in _global_multipliers(sigma, steps, drift=drift):
        ledger.record(q, z)
    return ledger


@pytest.mark.parametrize("acc", ["rdp", "pld"])
def test_global_clipping_ledger_exceeds_dpsgd(acc):
    q, sigma, steps = 0.05, 1.0, 12
    kw = {"pld_discretization": FAST_PLD} if acc == "pld" else {}
    ledger = _global_run(PrivacyLedger(acc, **kw), sigma, q, steps, drift=0.01)
    dpsgd = compute_epsilon(sigma, q, steps, DELTA, accountant=acc, **kw)
    assert ledger.epsilon(DELTA) > dpsgd * 1.05
    assert ledger.steps == steps


def test_elliptical_ledger_matches_dpsgd_whatever_the_allocation():
    q, sigma, steps = 0.05, 1.0, 50
    ledger = PrivacyLedger("rdp")
    rng = np.random.default_rng(1)
    for _ in range(steps):
        s = _allocation(D, rng.uniform(0.5, 2.0, len(D)))
        ledger.record(q, effective_noise_multiplier(sigma, s, "elliptical"))
    assert ledger.epsilon(DELTA) == compute_epsilon(sigma, q, steps, DELTA, accountant="rdp")


def test_discretisation_never_reduces_epsilon():
    q, sigma, steps = 0.02, 2.5, 30
    # slow drift (0.3% per step), so that nearby multipliers share grid cells
    coarse = _global_run(PrivacyLedger("rdp", grid=1e-2), sigma, q, steps, drift=3e-3)
    fine = _global_run(PrivacyLedger("rdp"), sigma, q, steps, drift=3e-3)
    exact = _global_run(PrivacyLedger("rdp", grid=0.0), sigma, q, steps, drift=3e-3)
    # the exact ledger keeps every distinct multiplier; the gridded ones merge them
    assert len(exact.dp_event().events) > 20
    assert len(coarse.dp_event().events) < len(fine.dp_event().events) < len(exact.dp_event().events)
    # each recorded multiplier is rounded down by less than one grid step
    probe = PrivacyLedger("rdp")
    for z in _global_multipliers(sigma, steps, drift=3e-3):
        probe.record(q, z)
        zr = probe.entries[-1][1]
        assert z / (1 + 1e-3) < zr <= z
    e_exact, e_fine, e_coarse = (led.epsilon(DELTA) for led in (exact, fine, coarse))
    # and the direct composition agrees with the exact ledger
    acc = dp_accounting.rdp.RdpAccountant()
    for q_, z_, c_ in exact.entries:
        acc.compose(dp_accounting.PoissonSampledDpEvent(q_, dp_accounting.GaussianDpEvent(z_)), c_)
    assert e_exact == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12)
    assert e_exact <= e_fine <= e_coarse
    assert e_fine <= e_exact * 1.01


def test_rounding_is_anchored_on_reference():
    led = PrivacyLedger("rdp", grid=1e-2, reference_noise_multiplier=2.0)
    led.record(0.1, 2.0)  # the anchor: exact
    led.record(0.1, 2.0 * 1.01**3 * 1.002)  # between grid points 3 and 4: rounded down to 3
    led.record(0.1, 2.0 * 1.01**3 * 1.007)  # same grid cell: merges
    led.record(0.1, 1.9999)  # just below the anchor: one grid step down
    zs = [z for _, z, _ in led.entries]
    assert zs[0] == 2.0
    assert zs[1] == pytest.approx(2.0 * 1.01**3, rel=1e-12) and zs[1] <= 2.0 * 1.01**3 * 1.002
    assert led.entries[1][2] == 2
    assert zs[2] == pytest.approx(2.0 / 1.01, rel=1e-12) and zs[2] <= 1.9999


def test_ledger_zero_noise_is_inf():
    led = PrivacyLedger("rdp")
    led.record(0.1, 1.0)
    led.record(0.1, 0.0)
    assert led.epsilon(DELTA) == math.inf


def test_ledger_state_dict_round_trip():
    q, sigma = 0.02, 2.5
    ledger = _global_run(PrivacyLedger("rdp"), sigma, q, 12)
    state = ledger.state_dict()
    for key, value in state.items():
        assert isinstance(value, (np.ndarray, str, float, int)), key
    assert state["accountant"] == "rdp"
    assert int(state["counts"].sum()) == 12
    # as an orbax restore may hand them back: 0-d arrays instead of python scalars
    restored = PrivacyLedger.from_state_dict(
        {k: (np.asarray(v) if not isinstance(v, np.ndarray) else v.copy()) for k, v in state.items()})
    assert restored.entries == ledger.entries
    assert restored.steps == 12
    assert restored.reference_noise_multiplier == ledger.reference_noise_multiplier
    assert restored.epsilon(DELTA) == ledger.epsilon(DELTA)
    # and through JSON (lists instead of arrays), as a JSON checkpoint item stores it
    as_json = json.loads(json.dumps(
        {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in state.items()}))
    assert PrivacyLedger.from_state_dict(as_json).entries == ledger.entries
    # resuming continues identically
    for led in (ledger, restored):
        led.record(q, 2.1)
        led.record(q, 2.1)
    assert restored.entries == ledger.entries
    assert restored.epsilon(DELTA) == ledger.epsilon(DELTA)
    # an empty ledger round-trips too
    empty = PrivacyLedger.from_state_dict(PrivacyLedger().state_dict())
    assert empty.accountant == "pld" and empty.steps == 0 and empty.epsilon(DELTA) == 0.0


def test_ledger_caches_epsilon(monkeypatch):
    ledger = PrivacyLedger("rdp")
    ledger.record(0.05, 1.0, count=10)
    calls = []
    real = accounting.epsilon_of_event

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(accounting, "epsilon_of_event", counting)
    e1 = ledger.epsilon(DELTA)
    e2 = ledger.epsilon(DELTA)
    assert e1 == e2 and len(calls) == 1
    ledger.epsilon(1e-6)
    assert len(calls) == 2
    ledger.record(0.05, 1.0)
    e3 = ledger.epsilon(DELTA)
    assert len(calls) == 3 and e3 > e1


def test_ledger_chronological_event():
    led = PrivacyLedger("rdp")
    for z in (1.0, 1.0, 0.9, 1.0):
        led.record(0.1, z)
    assert [e.count for e in led.dp_event(chronological=True).events] == [2, 1, 1]
    assert sorted(e.count for e in led.dp_event().events) == [1, 3]


# --------------------------------------------------------------------------
# delta
# --------------------------------------------------------------------------

def test_check_delta():
    assert check_delta(1e-5, 7677) == 1e-5
    with pytest.raises(ValueError, match=re.escape("delta=0.001 must be below 1/N = 0.0001 for N=10000")):
        check_delta(1e-3, 10_000)
    with pytest.raises(ValueError, match=r"delta=0\.0001 must be below 1/N"):
        check_delta(1e-4, 10_000)  # equal to 1/N is refused too
    with pytest.raises(ValueError, match=r"num_examples=0"):
        check_delta(1e-5, 0)


@pytest.mark.parametrize("n", [1, 10, 7677, 67_349, 99_999, 100_000, 392_702, 1_000_000, 10**9])
def test_default_delta_below_one_over_n(n):
    d = default_delta(n)
    assert 0 < d < 1.0 / n
    check_delta(d, n)
    if n < 100_000:
        assert d == 1e-5
    else:
        assert d < 1.0 / (10 * n)
        assert math.log10(d) == round(math.log10(d))  # a power of ten


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"delta": 1.5}, r"delta=1\.5 is outside \(0, 1\)"),
    ({"delta": 0.0}, r"delta=0\.0 is outside \(0, 1\)"),
    ({"sampling_rate": 0.0}, r"sampling_rate=0\.0 is outside \(0, 1\]"),
    ({"sampling_rate": 1.2}, r"sampling_rate=1\.2 is outside \(0, 1\]"),
    ({"steps": 0}, r"steps=0 must be an integer >= 1"),
    ({"steps": 2.5}, r"steps=2\.5 must be an integer >= 1"),
    ({"noise_multiplier": -1.0}, r"noise_multiplier=-1\.0 is outside \[0, inf\)"),
    ({"accountant": "gdp"}, r"accountant='gdp' is not one of \('pld', 'rdp'\)"),
])
def test_compute_epsilon_validation(kwargs, match):
    args = {"noise_multiplier": 1.0, "sampling_rate": 0.1, "steps": 10, "delta": 1e-5, "accountant": "rdp"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        compute_epsilon(**args)


@pytest.mark.parametrize("args,match", [
    ((-0.5, [1.0], "elliptical"), r"noise_multiplier=-0\.5 is outside \[0, inf\)"),
    ((1.0, [1.0, 0.0], "global"), r"scales must be positive and finite; got \[0\.0\]"),
    ((1.0, {"a": [-2.0]}, "elliptical"), r"got \[-2\.0\]"),
    ((1.0, [], "global"), r"scales=\[\] is empty"),
    ((1.0, [1.0], "layerwise"), r"clipping='layerwise' is not one of \('elliptical', 'global'\)"),
])
def test_effective_multiplier_validation(args, match):
    with pytest.raises(ValueError, match=match):
        effective_noise_multiplier(*args)
    with pytest.raises(ValueError, match=r"profile_noise_multiplier=-1\.0 is outside"):
        effective_noise_multiplier(1.0, [1.0], "elliptical", profile_noise_multiplier=-1.0)


def test_ledger_validation():
    with pytest.raises(ValueError, match=r"accountant='moments' is not one of"):
        PrivacyLedger("moments")
    with pytest.raises(ValueError, match=r"grid=1\.5 is outside \[0, 1\)"):
        PrivacyLedger(grid=1.5)
    led = PrivacyLedger("rdp")
    with pytest.raises(ValueError, match=r"sampling_rate=0 is outside \(0, 1\]"):
        led.record(0, 1.0)
    with pytest.raises(ValueError, match=r"noise_multiplier=-0\.1 is outside"):
        led.record(0.1, -0.1)
    with pytest.raises(ValueError, match=r"count=0 must be an integer >= 1"):
        led.record(0.1, 1.0, count=0)
    with pytest.raises(ValueError, match=r"delta=2 is outside \(0, 1\)"):
        led.epsilon(2)
    assert led.steps == 0 and led.reference_noise_multiplier is None


def test_tiny_noise_multiplier_falls_back_to_rdp_instead_of_crashing():
    eps = compute_epsilon(1e-4, 0.03, 20, 1e-5)
    assert eps == compute_epsilon(1e-4, 0.03, 20, 1e-5, accountant="rdp") and eps > 1e3
