"""The privatiser: a clipped sum -> Gaussian noise -> the released mean gradient.

Clipping (`anadp.clipping`, or `anadp.ghost` for large models) returns a
batch's clipped sum (a `GradientSum`: gradients and, for `private_profile`,
the norm profile), and one privatiser consumes it: `add_noise`. The ways in:

- `privatize(per_example_grads, scales, key, ...)`: one step as a pure
  function over per-example gradients with a mask (clip, sum, `add_noise`).
  The audit (`anadp.audit`) and users' own loops call it.
- `Mechanism`: a run's hyperparameters, its state between steps (noise key,
  step count, importance EMAs, the next allocation) and
  `Mechanism.release(clipped, state, params)`: `add_noise` with the step's
  key and allocation, then the importance update that sets the next
  allocation. Training calls `release` on the sums of its clipping engine.
  The mechanism also says how each step is accounted
  (`accounted_noise_multiplier`) and calibrates its sigma (`calibrated`).
- `dp_aggregate(mechanism)`: the same `Mechanism` as an optax
  `GradientTransformation` over per-example gradients with a leading batch
  axis, like `optax.contrib.differentially_private_aggregate`, so it composes
  with any optax optimiser:

    mechanism = anadp.Mechanism(1.0, 0.9, 256.0, adaptive=True, gamma=0.5, rho=2.0)
    tx = optax.chain(anadp.dp_aggregate(mechanism), optax.adam(1e-3))

Privacy (METHOD.md): either clip function ("clip", "automatic") bounds an
example's contribution by C, so the noise and the guarantee do not depend on
which one is used. With elliptical clipping (the default), the noisy whitened sum
`H = sum_i clip_C(g_i / s) + N(0, sigma^2 C^2 I)` is DP-SGD's subsampled
Gaussian mechanism with multiplier sigma for any fixed allocation s, the
release `s * H / (qN)` is post-processing, and s at step t+1 is computed only
from releases up to t. Global clipping with a non-uniform s is only as private
as its least-noised group (`accounting.effective_noise_multiplier`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from anadp import _checks, accounting, allocation, calibration, importance, randomness
from anadp.allocation import Groups
from anadp.clipping import DEFAULT_AUTOMATIC_R, GradientSum, check_clip_fn, check_clipping, clipped_sum


def gaussian_noise(key: jax.Array, like: Any) -> Any:
    """Standard normal noise shaped like `like` (float32), one subkey per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, jnp.shape(x), jnp.float32) for k, x in zip(keys, leaves)]
    )


def add_noise(
    clipped_grads: Any,
    scales: Any,
    key: jax.Array,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    clipping: str,
) -> Any:
    """Adds Gaussian noise to a clipped sum and returns the noisy mean.

    Group k (each leaf carries its group's scale s_k in `scales`) receives noise
    of standard deviation `noise_multiplier * l2_norm_clip * s_k` on the sum,
    i.e. `... / expected_batch_size` on the returned mean:

      elliptical:  G = s * (sum_i hbar_i + N(0, sigma^2 C^2 I)) / (q N)
      global:      G = (sum_i gbar_i + s * N(0, sigma^2 C^2 I)) / (q N)

    The denominator is the expected batch size qN, never the realised one.
    """
    check_clipping(clipping)
    std = noise_multiplier * l2_norm_clip
    noise = gaussian_noise(key, clipped_grads)
    if scales is None:
        scales = jax.tree_util.tree_map(lambda _: jnp.ones([], jnp.float32), clipped_grads)

    if clipping == "elliptical":
        def release(total, z, s):
            return s * (total + std * z) / expected_batch_size
    else:
        def release(total, z, s):
            return (total + s * (std * z)) / expected_batch_size

    return jax.tree_util.tree_map(release, clipped_grads, noise, scales)


def privatize(
    per_example_grads: Any,
    scales: Any,
    key: jax.Array,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    clipping: str = "elliptical",
    mask: jax.Array | None = None,
    clip_fn: str = "clip",
    automatic_r: float = DEFAULT_AUTOMATIC_R,
) -> Any:
    """One step of the mechanism: clip, sum, add noise, average.

    Stateless: the caller supplies the noise key and the allocation. Training
    runs the same privatiser (`add_noise`) through `Mechanism.release`, with
    the run's key schedule and allocation state, on sums from its clipping
    engine.

    Args:
      per_example_grads: tree of arrays with a leading batch axis.
      scales: tree with the gradient's structure, one positive scalar per leaf
        (the noise scale s_k of the leaf's group); None means uniform (DP-SGD).
      key: PRNG key for the noise.
      l2_norm_clip: C. noise_multiplier: sigma. expected_batch_size: qN.
      clipping: "elliptical" or "global".
      mask: [B], 0 for padding rows (which contribute exactly nothing).
      clip_fn, automatic_r: "clip" or "automatic" (C h / (||h|| + r)); the noise
        is the same for both.

    Returns:
      The privatised mean gradient G of METHOD.md. Elliptical: releasing G is
      (sigma)-Gaussian-DP per step in the sense of DP-SGD (the whitened
      contribution of one example has norm <= C). Global: only
      (sigma * min_k s_k).
    """
    clipped = clipped_sum(
        per_example_grads, scales, l2_norm_clip=l2_norm_clip, clipping=clipping, mask=mask,
        clip_fn=clip_fn, automatic_r=automatic_r,
    )
    return add_noise(
        clipped.grads,
        scales,
        key,
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        clipping=clipping,
    )


class MechanismState(NamedTuple):
    """What a mechanism carries between steps. All of it but the noise key is public.

    Attributes:
      noise_key: PRNG key; split once per step, so no key is ever reused, also
        across a resume from a checkpoint of this state. Secret: whoever has it
        can regenerate the noise (checkpoints that hold it are secret material).
      count: number of steps released so far.
      importance: the estimator's state (EMAs of released quantities); () for DP-SGD.
      scales: the allocation for the next step: a tree like the params with one
        scalar per leaf (its group's s_k); all ones for DP-SGD.
    """

    noise_key: jax.Array
    count: jax.Array
    importance: Any
    scales: Any


def group_values(leaf_tree: Any, groups: Groups) -> jax.Array:
    """[K] values of a per-leaf tree whose leaves are constant within each group."""
    leaves = jax.tree_util.tree_leaves(leaf_tree)
    first = {}
    for leaf_index, g in enumerate(groups.leaf_group):
        first.setdefault(g, leaf_index)
    return jnp.stack([jnp.asarray(leaves[first[g]], jnp.float32) for g in range(groups.num_groups)])


@dataclasses.dataclass(frozen=True)
class Mechanism:
    """DP-SGD or ANADP for one run: hyperparameters plus pure step functions.

    With `adaptive=False` this is DP-SGD: uniform noise (s = 1), where
    elliptical and global clipping are the same computation. With
    `adaptive=True` the group noise scales follow the importance estimator
    (ANADP); `clipping="elliptical"` (the default) keeps DP-SGD's guarantee
    exactly, `clipping="global"` is the literal reading of the paper (for
    comparison). `clip_fn="automatic"` replaces clipping by per-example
    normalisation C h / (||h|| + automatic_r) in either case, with the same
    guarantee. `dp_aggregate(mechanism)` is the optax transform.
    """

    l2_norm_clip: float
    noise_multiplier: float
    expected_batch_size: float
    seed: int | None = None
    adaptive: bool = False
    clipping: str = "elliptical"
    gamma: float = 0.0
    rho: float = 2.0
    warmup_steps: int = 0
    grouping: str = "array"
    importance: str = "elementwise"
    beta1: float = 0.85
    beta2: float = 0.85
    profile_noise_ratio: float = 5.0
    clip_fn: str = "clip"
    automatic_r: float = DEFAULT_AUTOMATIC_R

    def __post_init__(self):
        _checks.at_least("l2_norm_clip", self.l2_norm_clip, 0, strict=True)
        _checks.at_least("noise_multiplier", self.noise_multiplier, 0)
        _checks.at_least("expected_batch_size", self.expected_batch_size, 0, strict=True)
        check_clipping(self.clipping)
        check_clip_fn(self.clip_fn, self.automatic_r)
        if self.adaptive:
            allocation.check_allocation_args(self.gamma, self.rho, self.warmup_steps)
            _checks.one_of("grouping", self.grouping, allocation.GROUPINGS)
            importance.make_estimator(self.importance, beta1=self.beta1, beta2=self.beta2)
            if self.uses_profile:
                _checks.at_least("profile_noise_ratio", self.profile_noise_ratio, 0, strict=True)

    # --- static helpers ------------------------------------------------------

    @property
    def estimator(self) -> importance.Estimator | None:
        if not self.adaptive:
            return None
        return importance.make_estimator(self.importance, beta1=self.beta1, beta2=self.beta2)

    @property
    def uses_profile(self) -> bool:
        return self.adaptive and self.importance == "private_profile"

    @property
    def profile_noise_multiplier(self) -> float | None:
        """sigma_u of the released profile, or None when nothing extra is released."""
        return self.profile_noise_ratio * self.noise_multiplier if self.uses_profile else None

    def groups(self, params: Any) -> Groups:
        return allocation.make_groups(params, self.grouping)

    def profile_groups(self, params: Any) -> Groups | None:
        """The groups to pass to clipping when the profile must be summed, else None."""
        return self.groups(params) if self.uses_profile else None

    def worst_case_scale(self, params: Any) -> float:
        """The smallest `min_k s_k` this mechanism's allocation can ever produce.

        1 for DP-SGD and for `gamma = 0`; otherwise the bound of
        `allocation.min_noise_scale` for these parameters' groups and `rho`,
        whatever the importances. The literal variant's guarantee rests on it.
        """
        if not self.adaptive or self.gamma == 0.0:
            return 1.0
        return allocation.min_noise_scale(self.groups(params).sizes, self.rho)

    def accounted_scale(self, step: int, worst_case_scale: float) -> float:
        """The group scale that step `step` (0-based) is accounted at (METHOD.md, "Accounting").

        Elliptical clipping: 1 (the step is DP-SGD's mechanism at sigma for any
        allocation). Global clipping: 1 for the steps whose allocation is
        uniform by construction (the first, and the warmup steps), else the
        data-independent worst case. The realised allocation is chosen from
        earlier releases, so composing it would need a privacy filter; the
        worst case needs none.
        """
        uniform = step < max(1, self.warmup_steps)
        return 1.0 if self.clipping == "elliptical" or uniform else float(worst_case_scale)

    # --- accounting (host side) -------------------------------------------------

    def effective_noise_multiplier(self, group_scales: Any = (1.0,)) -> float:
        """The multiplier z of one step whose allocation was `group_scales` (default uniform).

        sigma for elliptical clipping, sigma * min_k s_k for global clipping,
        combined with the profile release for `private_profile`
        (`accounting.effective_noise_multiplier`). For an adaptive run's steps
        that is the realised multiplier, not a guarantee: the ledger records
        `accounted_noise_multiplier`.
        """
        return accounting.effective_noise_multiplier(
            self.noise_multiplier, group_scales, self.clipping, self.profile_noise_multiplier
        )

    def accounted_noise_multiplier(self, step: int, worst_case_scale: float) -> float:
        """The multiplier z at which step `step` (0-based) is accounted: the run's
        guarantee composes `PoissonSampledDpEvent(q, GaussianDpEvent(z))` over its
        steps. `worst_case_scale` is `self.worst_case_scale(params)`."""
        return self.effective_noise_multiplier([self.accounted_scale(step, worst_case_scale)])

    def calibrated(self, target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                   accountant: str = "pld") -> Mechanism:
        """This mechanism with the smallest sigma whose `steps` steps at rate
        `sampling_rate` meet `(target_epsilon, delta)` at uniform scales
        (`calibration.calibrate_noise_multiplier`, the profile release included).
        The literal variant is calibrated to DP-SGD's claim like the others; its
        accounted epsilon (worst case) is then above the target."""
        ratio = self.profile_noise_ratio if self.uses_profile else None
        sigma = calibration.calibrate_noise_multiplier(
            target_epsilon, delta, sampling_rate, steps, accountant=accountant, profile_noise_ratio=ratio
        )
        return dataclasses.replace(self, noise_multiplier=sigma)

    # --- state -----------------------------------------------------------------

    def init(self, params: Any, noise_key: jax.Array | None = None) -> MechanismState:
        """The state before the first step.

        The noise key is `noise_key` if given (the training loop passes its
        run's secrets), else `PRNGKey(seed)` for a seeded mechanism, else fresh
        from the operating system's entropy (`seed=None`, the default): noise
        that anyone can regenerate protects nothing (METHOD.md, "Randomness").
        Call it outside `jit`, so that a secure key is drawn on every call.
        """
        ones = jax.tree_util.tree_map(lambda _: jnp.ones([], jnp.float32), params)
        estimator = self.estimator
        state = () if estimator is None else estimator.init(params, self.groups(params))
        if noise_key is None:
            noise_key = jax.random.PRNGKey(self.seed) if self.seed is not None else randomness.secure().noise_key
        return MechanismState(
            noise_key=jnp.asarray(noise_key, jnp.uint32),
            count=jnp.zeros([], jnp.int32),
            importance=state,
            scales=ones,
        )

    def clip_scales(self, state: MechanismState) -> Any:
        """The per-leaf scales to whiten with before clipping (None for global clipping)."""
        return state.scales if self.clipping == "elliptical" else None

    # --- one step ------------------------------------------------------------

    def release(
        self, clipped: GradientSum, state: MechanismState, params: Any
    ) -> tuple[Any, MechanismState]:
        """Noises clipped sums, releases the mean gradient, updates importance.

        `clipped` must have been computed with `clip_scales(state)` and, for
        `private_profile`, with `profile_groups(params)`. Returns the released
        mean gradient and the next state. Only released values (the noisy
        gradient, the noisy profile) and public values reach the estimator.
        """
        noise_key, step_key = jax.random.split(state.noise_key)
        grad_key, profile_key = jax.random.split(step_key)
        released = add_noise(
            clipped.grads,
            state.scales,
            grad_key,
            l2_norm_clip=self.l2_norm_clip,
            noise_multiplier=self.noise_multiplier,
            expected_batch_size=self.expected_batch_size,
            clipping=self.clipping,
        )
        count = state.count + 1
        if not self.adaptive:
            return released, state._replace(noise_key=noise_key, count=count)

        groups = self.groups(params)
        group_scales = group_values(state.scales, groups)
        noise_std = self.noise_multiplier * self.l2_norm_clip * group_scales / self.expected_batch_size
        profile = None
        if self.uses_profile:
            if clipped.profile is None:
                raise ValueError("private_profile needs clipped sums computed with profile_groups(params)")
            noisy = clipped.profile + self.profile_noise_multiplier * jax.random.normal(
                profile_key, clipped.profile.shape, jnp.float32
            )
            profile = noisy / self.expected_batch_size
        estimator = self.estimator
        importance_state = estimator.update(
            state.importance, importance.Release(released, noise_std, profile), params, groups
        )
        scores = estimator.group_scores(importance_state, groups)
        adapted = allocation.noise_scales(scores, groups.sizes, gamma=self.gamma, rho=self.rho)
        next_scales = jnp.where(count < self.warmup_steps, allocation.uniform_scales(groups), adapted)
        return released, MechanismState(
            noise_key=noise_key,
            count=count,
            importance=importance_state,
            scales=allocation.broadcast_to_leaves(next_scales, groups, params),
        )


def dp_aggregate(mechanism: Mechanism) -> optax.GradientTransformationExtraArgs:
    """`mechanism` as an optax transform over per-example gradients; put it first in an `optax.chain`.

    `init(params)` is `mechanism.init(params)` (a secret noise key unless the
    mechanism is seeded). `update(per_example_grads, state, params, mask=None)`
    takes gradients with a leading batch axis (mask: 0 for padding rows), clips
    them with the state's allocation (`clipping.clipped_sum`) and returns
    `mechanism.release` of the clipped sum: the privatised mean gradient and the
    next state. The step is accounted as `mechanism.accounted_noise_multiplier` says.
    """

    def init_fn(params):
        return mechanism.init(params)

    def update_fn(per_example_grads, state, params=None, *, mask=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("the DP aggregate needs params: call update(grads, state, params)")
        clipped = clipped_sum(
            per_example_grads,
            mechanism.clip_scales(state),
            l2_norm_clip=mechanism.l2_norm_clip,
            clipping=mechanism.clipping,
            mask=mask,
            groups=mechanism.profile_groups(params),
            clip_fn=mechanism.clip_fn,
            automatic_r=mechanism.automatic_r,
        )
        return mechanism.release(clipped, state, params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
