"""Group importance estimators (METHOD.md, "The importance score").

Each estimator is three pure functions bundled in an `Estimator`:

    state  = init(params, groups)
    state  = update(state, release, params, groups)
    scores = group_scores(state, groups)           # shape [K], larger = more important

`update` sees only a `Release`: what one step of the mechanism made public (the
noisy mean gradient, the per-group noise level, which is a function of public
hyperparameters, and for `private_profile` the noised per-group profile). It
never sees a raw or per-example gradient, so every allocation derived from it
is post-processing of earlier releases and adaptive composition applies.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from anadp import _checks, allocation
from anadp.allocation import Groups

ESTIMATORS = ("elementwise", "group_taylor", "signal", "private_profile")


class Release(NamedTuple):
    """What one mechanism step released; the only input an estimator may read.

    Attributes:
      grad: the privatised mean gradient `ghat_t` (a tree like the params).
      noise_std: [K] standard deviation, per coordinate, of the Gaussian noise in
        `grad` for each group: `sigma * C * s_k / (q N)`. Public.
      profile: [K] the released per-group norm profile `U_t / (q N)` (only for
        `private_profile`; None otherwise).
    """

    grad: Any
    noise_std: jax.Array
    profile: jax.Array | None = None


class Estimator(NamedTuple):
    init: Callable[[Any, Groups], Any]
    update: Callable[[Any, Release, Any, Groups], Any]
    group_scores: Callable[[Any, Groups], jax.Array]
    uses_profile: bool = False


def _leaf_sums(tree: Any) -> list[jax.Array]:
    return [jnp.sum(x) for x in jax.tree_util.tree_leaves(tree)]


def _ema(old, new, beta):
    return beta * old + (1.0 - beta) * new


# --- elementwise: the paper's scorer (AdaLoRA / PLATON) ----------------------


class ElementwiseState(NamedTuple):
    sensitivity: Any  # Ibar, per element
    uncertainty: Any  # Ubar, per element


def _elementwise_init(params, groups):
    del groups
    def zeros():
        return jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, jnp.float32), params)

    return ElementwiseState(zeros(), zeros())


def _elementwise_update(state, release, params, groups, *, beta1, beta2):
    del groups
    score = jax.tree_util.tree_map(lambda p, g: jnp.abs(p * g), params, release.grad)
    sensitivity = jax.tree_util.tree_map(
        lambda s, i: _ema(s, i, beta1), state.sensitivity, score
    )
    uncertainty = jax.tree_util.tree_map(
        lambda u, i, s: _ema(u, jnp.abs(i - s), beta2),
        state.uncertainty,
        score,
        sensitivity,
    )
    return ElementwiseState(sensitivity, uncertainty)


def _elementwise_scores(state, groups):
    products = jax.tree_util.tree_map(jnp.multiply, state.sensitivity, state.uncertainty)
    return allocation.group_sum(_leaf_sums(products), groups) / groups.sizes


# --- group_taylor: first-order change of the loss if the group were removed ---


class GroupEmaState(NamedTuple):
    sensitivity: jax.Array  # [K]
    uncertainty: jax.Array  # [K]


def _group_ema_init(params, groups):
    del params
    return GroupEmaState(jnp.zeros(groups.num_groups, jnp.float32), jnp.zeros(groups.num_groups, jnp.float32))


def _group_ema_update(state, value, *, beta1, beta2):
    sensitivity = _ema(state.sensitivity, value, beta1)
    uncertainty = _ema(state.uncertainty, jnp.abs(value - sensitivity), beta2)
    return GroupEmaState(sensitivity, uncertainty)


def _group_taylor_update(state, release, params, groups, *, beta1, beta2):
    inner = jax.tree_util.tree_map(lambda p, g: p * g, params, release.grad)
    taylor = jnp.abs(allocation.group_sum(_leaf_sums(inner), groups))
    return _group_ema_update(state, taylor, beta1=beta1, beta2=beta2)


def _group_ema_scores(state, groups):
    del groups
    return state.sensitivity * state.uncertainty


# --- signal: debiased energy of a gradient momentum -------------------------


class SignalState(NamedTuple):
    momentum: Any  # m, a tree like the params
    noise_energy: jax.Array  # [K] variance per coordinate of the noise carried by m
    count: jax.Array  # steps seen, for the (1 - beta^t) bias correction


def _signal_init(params, groups):
    momentum = jax.tree_util.tree_map(lambda p: jnp.zeros_like(p, jnp.float32), params)
    return SignalState(momentum, jnp.zeros(groups.num_groups, jnp.float32), jnp.zeros([], jnp.int32))


def _signal_update(state, release, params, groups, *, beta):
    del params, groups
    momentum = jax.tree_util.tree_map(
        lambda m, g: _ema(m, g, beta), state.momentum, release.grad
    )
    # Exact recursion for the noise variance in m: each step's noise is
    # independent with std noise_std, weighted by (1 - beta) and decayed by beta.
    # It tends to METHOD.md's stationary value (1 - beta) / (1 + beta) * std^2,
    # and stays exact when the allocation (hence std) changes between steps.
    noise_energy = beta**2 * state.noise_energy + (1.0 - beta) ** 2 * release.noise_std**2
    return SignalState(momentum, noise_energy, state.count + 1)


def _signal_scores(state, groups, *, beta):
    energy = allocation.group_sum(_leaf_sums(jax.tree_util.tree_map(jnp.square, state.momentum)), groups)
    signal_energy = debiased_signal_energy(energy, state.noise_energy, state.count, groups.sizes, beta)
    return jnp.sqrt(jnp.maximum(signal_energy, 0.0) / groups.sizes)


def debiased_signal_energy(momentum_energy, noise_energy, count, sizes, beta):
    """Unbiased estimate of `||E[ghat_k]||^2` from the momentum (before the floor at 0).

    `E||m_k||^2 = ||E m_k||^2 + d_k * noise_energy_k`, and for a constant mean
    gradient `E m_k = (1 - beta^t) E ghat_k`; subtracting the noise term and
    undoing the start-up bias gives an unbiased estimate.
    """
    bias = jnp.where(count > 0, 1.0 - beta ** count.astype(jnp.float32), 1.0)
    return (momentum_energy - sizes * noise_energy) / bias**2


# --- private_profile: a separately noised per-group norm profile -------------


class ProfileState(NamedTuple):
    profile: jax.Array  # [K] EMA of the released profile


def _profile_init(params, groups):
    del params
    return ProfileState(jnp.zeros(groups.num_groups, jnp.float32))


def _profile_update(state, release, params, groups, *, beta):
    del params, groups
    if release.profile is None:
        raise ValueError("importance='private_profile' needs a release with a profile")
    return ProfileState(_ema(state.profile, release.profile, beta))


def _profile_scores(state, groups):
    # The profile estimates each group's share of gradient norm; per coordinate
    # that is share / sqrt(d_k). No (1 - beta^t) correction: it cancels in the
    # allocation, which only uses importances relative to their mean.
    return state.profile / jnp.sqrt(jnp.asarray(groups.sizes, jnp.float32))


def make_estimator(name: str, *, beta1: float = 0.85, beta2: float = 0.85) -> Estimator:
    """The estimator called `name` (one of ESTIMATORS) with its EMA rates.

    `beta1` is the sensitivity EMA rate (also the momentum / profile rate of
    `signal` and `private_profile`); `beta2` the uncertainty EMA rate.
    """
    for label, beta in (("beta1", beta1), ("beta2", beta2)):
        _checks.in_interval(label, beta, "[0, 1)")
    if name == "elementwise":
        return Estimator(
            _elementwise_init,
            functools.partial(_elementwise_update, beta1=beta1, beta2=beta2),
            _elementwise_scores,
        )
    if name == "group_taylor":
        return Estimator(
            _group_ema_init,
            functools.partial(_group_taylor_update, beta1=beta1, beta2=beta2),
            _group_ema_scores,
        )
    if name == "signal":
        return Estimator(
            _signal_init,
            functools.partial(_signal_update, beta=beta1),
            functools.partial(_signal_scores, beta=beta1),
        )
    if name == "private_profile":
        return Estimator(
            _profile_init,
            functools.partial(_profile_update, beta=beta1),
            _profile_scores,
            uses_profile=True,
        )
    raise ValueError(f"importance={name!r} is not one of {ESTIMATORS}")


def group_mean_abs(params: Any, groups: Groups) -> np.ndarray:
    """Mean |theta| of each group (public)."""
    sums = allocation.group_sum(_leaf_sums(jax.tree_util.tree_map(jnp.abs, params)), groups)
    return np.asarray(sums) / groups.sizes


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two vectors (average ranks for ties)."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def importance_weight_correlation(scores: Any, params: Any, groups: Groups) -> float:
    """Rank correlation between group importance and group mean |theta|.

    Logged at every evaluation so a reader can tell whether the allocation
    follows the task or only the size of the weights (METHOD.md).
    """
    return rank_correlation(np.asarray(scores), group_mean_abs(params, groups))
