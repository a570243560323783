"""Privacy accounting for ANADP (host side, on ``dp_accounting``; no JAX).

Every bound computed here is an ``(epsilon, delta)``-DP guarantee under
**add-or-remove-one** neighbouring datasets for a run whose steps each
sample the dataset by **Poisson sampling** with rate ``q`` (every example
independently) and release one Gaussian mechanism of L2 sensitivity ``C``
with noise standard deviation ``z * C``. A step is therefore
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` and a run the composition
of its steps (METHOD.md, "Accounting"). Shuffled or fixed-size batches do not
match these events.

Accountants: ``"pld"`` (privacy loss distributions, the default; tight up to
its discretisation, which is pessimistic) or ``"rdp"`` (Renyi DP; looser but
cheap to compose).

``z`` is always the step's *effective* multiplier:

* elliptical clipping (the default mechanism): ``z = sigma`` whatever the
  allocation ``s``;
* the literal global-clipping variant: ``z = sigma * min_k s_k``;
* with the ``private_profile`` estimator the step also releases a K-vector
  of sensitivity 1 with multiplier ``sigma_u``, from the same sample, so the
  step is one Gaussian mechanism with ``z_eff = (z^-2 + sigma_u^-2)^(-1/2)``.

See :func:`effective_noise_multiplier`; a run's mechanism says which ``z``
each of its steps is accounted at (``noise.Mechanism.accounted_noise_multiplier``).
Calibrating ``sigma`` to a target epsilon: ``anadp.calibration``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import dp_accounting
import numpy as np

from anadp import _checks

__all__ = [
    "ACCOUNTANTS",
    "CLIPPING_MODES",
    "DEFAULT_LEDGER_GRID",
    "DEFAULT_PLD_DISCRETIZATION",
    "PrivacyLedger",
    "check_delta",
    "combine_noise_multipliers",
    "compute_epsilon",
    "default_delta",
    "effective_noise_multiplier",
    "epsilon_of_event",
    "make_accountant",
    "make_step_event",
]

ACCOUNTANTS = ("pld", "rdp")
CLIPPING_MODES = ("elliptical", "global")  # the one definition (anadp.clipping uses it)

#: PLD ``value_discretization_interval`` (dp_accounting's default). The PLD
#: discretisation is pessimistic: a coarser value gives a (slightly) larger
#: epsilon and is much faster to compute.
DEFAULT_PLD_DISCRETIZATION = 1e-4

#: Relative step of the geometric grid onto which :class:`PrivacyLedger`
#: rounds noise multipliers *down* (see its docstring).
DEFAULT_LEDGER_GRID = 1e-3

_ADD_OR_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def _check_accountant(accountant: Any) -> str:
    return str(_checks.one_of("accountant", accountant, ACCOUNTANTS))


def _check_pld_discretization(value: Any) -> float:
    return _checks.in_interval("pld_discretization", value, "(0, inf)")


def make_accountant(accountant: str, pld_discretization: float) -> dp_accounting.PrivacyAccountant:
    """A fresh ``dp_accounting`` accountant ("pld" or "rdp"), add-or-remove-one neighbours."""
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant(
            neighboring_relation=_ADD_OR_REMOVE,
            value_discretization_interval=pld_discretization,
        )
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=_ADD_OR_REMOVE)


def epsilon_of_event(event: dp_accounting.DpEvent, delta: float, accountant: str,
                     pld_discretization: float) -> float:
    """Epsilon at ``delta`` of ``event`` (arguments already checked); PLD falls back to RDP on overflow."""
    acc = make_accountant(accountant, pld_discretization)
    try:
        return float(acc.compose(event).get_epsilon(delta))
    except (MemoryError, OverflowError) as e:
        if accountant != "pld":
            raise
        # A tiny multiplier makes the PLD's support astronomically wide. RDP is a
        # valid (looser) upper bound, so report that rather than crash.
        logging.warning("PLD accounting failed (%s); reporting the RDP bound instead", type(e).__name__)
        return epsilon_of_event(event, delta, "rdp", pld_discretization)


def make_step_event(noise_multiplier: float, sampling_rate: float, steps: int = 1) -> dp_accounting.DpEvent:
    """The ``dp_accounting`` event of ``steps`` Poisson-sampled Gaussian steps.

    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps)``.
    """
    z = _checks.noise_multiplier(noise_multiplier)
    q = _checks.sampling_rate(sampling_rate)
    t = _checks.integer("steps", steps, 1)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), t
    )


# --------------------------------------------------------------------------
# delta
# --------------------------------------------------------------------------

def check_delta(delta: float, num_examples: int) -> float:
    """Validate ``delta`` for a dataset of ``num_examples`` examples.

    ``delta`` must lie in (0, 1) and strictly below ``1/N``: a delta of order
    ``1/N`` allows a mechanism that publishes one random example outright.
    Returns ``delta`` as a float; raises ``ValueError`` otherwise.
    """
    n = _checks.integer("num_examples", num_examples, 1)
    d = _checks.delta(delta)
    if d >= 1.0 / n:
        raise ValueError(
            f"delta={delta!r} must be below 1/N = {1.0 / n:.6g} for N={n} examples"
        )
    return d


def default_delta(num_examples: int) -> float:
    """Default ``delta`` for ``N = num_examples`` examples: always below ``1/N``.

    ``1e-5`` (the customary value in DP fine-tuning) when ``1e-5 < 1/N``, i.e.
    ``N < 100,000``; otherwise the largest power of ten strictly below
    ``1/(10 N)`` (e.g. ``1e-7`` for N = 393,000), so that delta stays at least
    ten times below ``1/N`` for large datasets. Pass an explicit delta to
    override; it is checked by :func:`check_delta`.
    """
    n = _checks.integer("num_examples", num_examples, 1)
    if 1e-5 * n < 1.0:
        return 1e-5
    # 10N has len(str(10N)) digits, so 10N < 10**k and 10**-k < 1/(10N).
    k = len(str(10 * n))
    return float(10.0 ** (-k))


# --------------------------------------------------------------------------
# epsilon and calibration
# --------------------------------------------------------------------------

def compute_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
                    accountant: str = "pld", *,
                    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> float:
    """Epsilon at ``delta`` of ``steps`` Poisson-sampled Gaussian steps.

    Bounds the ``(epsilon, delta)``-DP of the ``steps``-fold composition of
    ``PoissonSampledDpEvent(sampling_rate, GaussianDpEvent(noise_multiplier))``
    under add-or-remove-one neighbours. ``noise_multiplier`` is the step's
    effective multiplier (see :func:`effective_noise_multiplier`); 0 gives
    ``inf``.
    """
    z = _checks.noise_multiplier(noise_multiplier)
    q = _checks.sampling_rate(sampling_rate)
    t = _checks.integer("steps", steps, 1)
    d = _checks.delta(delta)
    acc = _check_accountant(accountant)
    disc = _check_pld_discretization(pld_discretization)
    if z == 0.0:
        return math.inf
    return epsilon_of_event(make_step_event(z, q, t), d, acc, disc)


# --------------------------------------------------------------------------
# effective multiplier of a step
# --------------------------------------------------------------------------

def _flatten_scales(scales: Any) -> np.ndarray:
    leaves: list[np.ndarray] = []

    def visit(node: Any) -> None:
        if isinstance(node, Mapping):
            for v in node.values():
                visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)
        elif node is None:
            return
        else:
            leaves.append(np.asarray(node, dtype=np.float64).reshape(-1))

    visit(scales)
    if not leaves:
        return np.zeros((0,), np.float64)
    return np.concatenate(leaves)


def combine_noise_multipliers(z: float, sigma_u: float) -> float:
    """``(z^-2 + sigma_u^-2)^(-1/2)``, with 0 absorbing (no noise => no privacy)."""
    if z == 0.0 or sigma_u == 0.0:
        return 0.0
    if math.isinf(sigma_u):
        return z
    return 1.0 / math.sqrt(z ** -2 + sigma_u ** -2)


def effective_noise_multiplier(noise_multiplier: float, scales: Any, clipping: str,
                               profile_noise_multiplier: float | None = None) -> float:
    """The multiplier ``z`` at which one step is accounted.

    ``scales`` are the per-group noise scales ``s_k`` (an array-like, or a
    dict/list/tuple nesting of array-likes such as a pytree of per-group
    scalars; JAX arrays are read through ``np.asarray``).

    * ``clipping="elliptical"``: ``sigma``. Whitening by ``s`` before clipping
      makes the step exactly DP-SGD's mechanism with multiplier ``sigma``.
    * ``clipping="global"`` (the literal variant): ``sigma * min_k s_k``. One
      global clip bounds an example's contribution by ``C`` in total, and an
      adversary can put all of it in the least-noised group.

    ``profile_noise_multiplier=sigma_u`` adds the ``private_profile`` release
    (sensitivity 1, same sample): ``(z^-2 + sigma_u^-2)^(-1/2)``. The bound
    is for add-or-remove-one neighbours.
    """
    sigma = _checks.noise_multiplier(noise_multiplier)
    _checks.one_of("clipping", clipping, CLIPPING_MODES)
    s = _flatten_scales(scales)
    if s.size == 0:
        raise ValueError(f"scales={scales!r} is empty: at least one group scale is required")
    bad = ~(np.isfinite(s) & (s > 0.0))
    if bad.any():
        raise ValueError(
            f"scales must be positive and finite; got {s[bad][:5].tolist()} (scales are in (0, inf))")
    z = sigma if clipping == "elliptical" else sigma * float(s.min())
    if profile_noise_multiplier is not None:
        sigma_u = _checks.noise_multiplier(profile_noise_multiplier, "profile_noise_multiplier")
        z = combine_noise_multipliers(z, sigma_u)
    return float(z)


# --------------------------------------------------------------------------
# PrivacyLedger
# --------------------------------------------------------------------------

class PrivacyLedger:
    """Running record of a training run's steps, and its epsilon so far.

    Each step is recorded as ``(sampling_rate, z)`` with ``z`` the step's
    effective multiplier (:func:`effective_noise_multiplier`); the run is the
    composition of ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` over the
    steps, add-or-remove-one neighbours. Allocations depend only on earlier
    releases, so adaptive composition applies.

    **Conservative discretisation.** The global-clipping variant changes its
    multiplier at every step, and composing thousands of distinct PLDs is
    slow. With ``grid > 0`` each multiplier is rounded *down* onto the
    geometric grid ``anchor * (1 + grid)^k`` (k any integer) before it is
    recorded. ``anchor`` is ``reference_noise_multiplier`` or, when that is
    None, the first positive multiplier recorded. Less noise means more
    privacy loss, so rounding down can only increase the reported epsilon
    (by at most the effect of a relative change of ``grid`` in ``z``).
    The anchor itself is on the grid, so a run with a constant multiplier
    (elliptical clipping) is recorded exactly and its epsilon equals
    :func:`compute_epsilon`. ``grid=0`` records every value as-is.

    Entries are run-length compressed (consecutive equal entries are one
    ``(q, z, count)`` run). Because composition is commutative, the event
    that is accounted (:meth:`dp_event`) merges *all* runs with the same
    ``(q, z)`` into one ``SelfComposedDpEvent`` and composes the distinct ones
    in a ``ComposedDpEvent``; its cost grows with the number of distinct
    grid points, not with the number of steps. Epsilon is cached per
    ``(delta, entries)``.
    """

    def __init__(self, accountant: str = "pld", *, grid: float = DEFAULT_LEDGER_GRID,
                 reference_noise_multiplier: float | None = None,
                 pld_discretization: float = DEFAULT_PLD_DISCRETIZATION):
        self._accountant = _check_accountant(accountant)
        self._grid = _checks.in_interval("grid", grid, "[0, 1)")
        self._pld_discretization = _check_pld_discretization(pld_discretization)
        self._anchor: float | None = None
        if reference_noise_multiplier is not None:
            a = _checks.noise_multiplier(reference_noise_multiplier, "reference_noise_multiplier")
            if a == 0.0:
                raise ValueError(
                    f"reference_noise_multiplier={reference_noise_multiplier!r} is outside (0, inf)")
            self._anchor = a
        self._runs: list[list] = []  # [q, z, count], chronological
        self._cache: dict = {}

    # -- properties ---------------------------------------------------------
    @property
    def accountant(self) -> str:
        return self._accountant

    @property
    def grid(self) -> float:
        return self._grid

    @property
    def pld_discretization(self) -> float:
        return self._pld_discretization

    @property
    def reference_noise_multiplier(self) -> float | None:
        return self._anchor

    @property
    def steps(self) -> int:
        """Number of steps recorded."""
        return int(sum(r[2] for r in self._runs))

    @property
    def entries(self) -> list[tuple[float, float, int]]:
        """Chronological runs ``(sampling_rate, recorded multiplier, count)``."""
        return [(r[0], r[1], r[2]) for r in self._runs]

    def __len__(self) -> int:
        return self.steps

    def __repr__(self) -> str:
        return (f"PrivacyLedger(accountant={self._accountant!r}, steps={self.steps}, "
                f"runs={len(self._runs)}, grid={self._grid})")

    # -- recording ----------------------------------------------------------
    def _round_down(self, z: float) -> float:
        if z == 0.0 or self._grid == 0.0:
            return z
        if self._anchor is None:
            self._anchor = z
        a = self._anchor
        if z == a:
            return a
        log_step = math.log1p(self._grid)
        k = math.floor(math.log(z / a) / log_step)
        zr = a * math.exp(k * log_step)
        while zr > z:  # floating-point guard: never round up
            k -= 1
            zr = a * math.exp(k * log_step)
        return zr

    def record(self, sampling_rate: float, noise_multiplier: float, count: int = 1) -> None:
        """Record ``count`` steps at rate ``sampling_rate`` and effective multiplier ``noise_multiplier``."""
        q = _checks.sampling_rate(sampling_rate)
        c = _checks.integer("count", count, 1)
        z = self._round_down(_checks.noise_multiplier(noise_multiplier))
        if self._runs and self._runs[-1][0] == q and self._runs[-1][1] == z:
            self._runs[-1][2] += c
        else:
            self._runs.append([q, z, c])

    # -- accounting ---------------------------------------------------------
    def _merged(self) -> tuple[tuple[float, float, int], ...]:
        counts: dict[tuple[float, float], int] = {}
        for q, z, c in self._runs:
            counts[(q, z)] = counts.get((q, z), 0) + c
        return tuple((q, z, c) for (q, z), c in counts.items())

    def dp_event(self, chronological: bool = False) -> dp_accounting.ComposedDpEvent:
        """The run as a ``dp_accounting`` event.

        By default the accounted event: one ``SelfComposedDpEvent`` per
        distinct ``(q, z)``, composed. ``chronological=True`` gives one per
        run of consecutive equal steps, in order (same privacy, more events).
        """
        items = self.entries if chronological else self._merged()
        return dp_accounting.ComposedDpEvent([
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), c)
            for q, z, c in items
        ])

    def epsilon(self, delta: float) -> float:
        """Epsilon at ``delta`` of the steps recorded so far (0.0 before any step).

        Bounds the composition of the recorded Poisson-sampled Gaussian steps,
        add-or-remove-one neighbours; ``inf`` if any step had multiplier 0.
        """
        d = _checks.delta(delta)
        if not self._runs:
            return 0.0
        merged = self._merged()
        key = (d, merged)
        if key in self._cache:
            return self._cache[key]
        if any(z == 0.0 for _, z, _ in merged):
            eps = math.inf
        else:
            eps = epsilon_of_event(self.dp_event(), d, self._accountant, self._pld_discretization)
        if len(self._cache) >= 16:
            self._cache.clear()
        self._cache[key] = eps
        return eps

    # -- serialisation ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: numpy arrays and python scalars.

        ``sampling_rates`` (float64), ``noise_multipliers`` (float64, as
        recorded, i.e. after rounding) and ``counts`` (int64) hold the
        chronological runs; ``reference_noise_multiplier`` is NaN when unset.
        """
        return {
            "accountant": self._accountant,
            "grid": float(self._grid),
            "pld_discretization": float(self._pld_discretization),
            "reference_noise_multiplier": float("nan") if self._anchor is None else float(self._anchor),
            "sampling_rates": np.asarray([r[0] for r in self._runs], dtype=np.float64),
            "noise_multipliers": np.asarray([r[1] for r in self._runs], dtype=np.float64),
            "counts": np.asarray([r[2] for r in self._runs], dtype=np.int64),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`state_dict` (values may be numpy scalars / 0-d arrays)."""
        acc = state["accountant"]
        if isinstance(acc, np.ndarray):
            acc = acc.item()
        if isinstance(acc, bytes):
            acc = acc.decode()
        anchor = float(np.asarray(state["reference_noise_multiplier"]))
        ledger = cls(
            str(acc),
            grid=float(np.asarray(state["grid"])),
            reference_noise_multiplier=None if math.isnan(anchor) else anchor,
            pld_discretization=float(np.asarray(state["pld_discretization"])),
        )
        rates = np.asarray(state["sampling_rates"], dtype=np.float64).reshape(-1)
        mults = np.asarray(state["noise_multipliers"], dtype=np.float64).reshape(-1)
        counts = np.asarray(state["counts"], dtype=np.int64).reshape(-1)
        if not (rates.shape == mults.shape == counts.shape):
            raise ValueError(
                f"state_dict arrays differ in length: sampling_rates {rates.shape}, "
                f"noise_multipliers {mults.shape}, counts {counts.shape}")
        for q, z, c in zip(rates.tolist(), mults.tolist(), counts.tolist()):
            _checks.sampling_rate(q)
            _checks.noise_multiplier(z)
            _checks.integer("count", c, 1)
            # Values were already rounded when first recorded: restore verbatim.
            ledger._runs.append([q, z, c])
        return ledger
