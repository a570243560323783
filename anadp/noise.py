"""The privatiser: clipped sums -> Gaussian noise -> released mean gradient.

`privatize` is the mechanism of one step as a pure function. `Mechanism` holds
the hyperparameters of a run and carries the state between steps (noise key,
step count, importance EMAs, the allocation for the next step); its
`as_transform()` is an optax `GradientTransformation` that takes per-example
gradients with a leading batch axis, like
`optax.contrib.differentially_private_aggregate`, so it composes with any
optax optimiser:

    tx = optax.chain(anadp.anadp_aggregate(1.0, 0.9, 256.0, seed=0, gamma=0.5, rho=2.0),
                     optax.adam(1e-3))

The memory path (`Mechanism.release`) takes clipped sums computed microbatch by
microbatch (`clipping.clipped_grad_sum`) and shares everything after clipping
with `update`.

Privacy (METHOD.md): either clip function ("clip", "automatic") bounds an
example's contribution by C, so the noise and the guarantee do not depend on
which one is used. With elliptical clipping, the noisy whitened sum
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

from anadp import allocation, importance, randomness
from anadp.allocation import Groups
from anadp.clipping import DEFAULT_AUTOMATIC_R, ClippedSum, check_clip_fn, check_clipping, clipped_sum


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value} must be {bound}")


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


def current_scales(state: MechanismState) -> Any:
    """The noise scales (a tree like the params) the next step will use."""
    return state.scales


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

    With `adaptive=False` this is DP-SGD (uniform noise, global clipping). With
    `adaptive=True` the group noise scales follow the importance estimator
    (ANADP); `clipping="elliptical"` keeps DP-SGD's guarantee exactly,
    `clipping="global"` is the literal reading of the paper (for comparison).
    `clip_fn="automatic"` replaces clipping by per-example normalisation
    C h / (||h|| + automatic_r) in either case, with the same guarantee.
    Use `dp_sgd_aggregate` / `anadp_aggregate` for the optax transforms.
    """

    l2_norm_clip: float
    noise_multiplier: float
    expected_batch_size: float
    seed: int | None = None
    adaptive: bool = False
    clipping: str = "global"
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
        _check_positive("l2_norm_clip", self.l2_norm_clip)
        _check_positive("noise_multiplier", self.noise_multiplier, allow_zero=True)
        _check_positive("expected_batch_size", self.expected_batch_size)
        check_clipping(self.clipping)
        check_clip_fn(self.clip_fn, self.automatic_r)
        if self.adaptive:
            allocation.check_allocation_args(self.gamma, self.rho, self.warmup_steps)
            if self.grouping not in allocation.GROUPINGS:
                raise ValueError(f"grouping={self.grouping!r} is not one of {allocation.GROUPINGS}")
            importance.make_estimator(self.importance, beta1=self.beta1, beta2=self.beta2)
            if self.uses_profile:
                _check_positive("profile_noise_ratio", self.profile_noise_ratio)
        elif self.clipping != "global":
            raise ValueError("DP-SGD (adaptive=False) uses global clipping")

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
        """The per-leaf scales to whiten with before clipping (None for DP-SGD)."""
        return state.scales if self.clipping == "elliptical" else None

    # --- one step ------------------------------------------------------------

    def release(
        self, clipped: ClippedSum, state: MechanismState, params: Any
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

    def update(
        self,
        per_example_grads: Any,
        state: MechanismState,
        params: Any,
        mask: jax.Array | None = None,
    ) -> tuple[Any, MechanismState]:
        """Clip, noise and release a batch of per-example gradients."""
        clipped = clipped_sum(
            per_example_grads,
            self.clip_scales(state),
            l2_norm_clip=self.l2_norm_clip,
            clipping=self.clipping,
            mask=mask,
            groups=self.profile_groups(params),
            clip_fn=self.clip_fn,
            automatic_r=self.automatic_r,
        )
        return self.release(clipped, state, params)

    def as_transform(self) -> optax.GradientTransformationExtraArgs:
        """This mechanism as an optax transform over per-example gradients.

        `update(per_example_grads, state, params, mask=None)`: per-example
        gradients with a leading batch axis in, the privatised mean gradient out.
        Put it first in an `optax.chain`.
        """

        def init_fn(params):
            return self.init(params)

        def update_fn(per_example_grads, state, params=None, *, mask=None, **extra_args):
            del extra_args
            if params is None:
                raise ValueError("the DP aggregate needs params: call update(grads, state, params)")
            return self.update(per_example_grads, state, params, mask=mask)

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dp_sgd_aggregate(
    l2_norm_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    seed: int | None = None,
    *,
    clip_fn: str = "clip",
    automatic_r: float = DEFAULT_AUTOMATIC_R,
) -> optax.GradientTransformationExtraArgs:
    """DP-SGD: clip each example to C (or, with clip_fn="automatic", rescale it to
    C g / (||g|| + r)), sum, add N(0, sigma^2 C^2), divide by qN.

    `seed=None` (the default) draws the noise key from the operating system's
    entropy at `init`; an int seed makes the noise reproducible by anyone who
    knows it (research only).
    """
    return Mechanism(
        l2_norm_clip, noise_multiplier, expected_batch_size, seed, clip_fn=clip_fn, automatic_r=automatic_r
    ).as_transform()


def anadp_aggregate(
    l2_norm_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    seed: int | None = None,
    *,
    gamma: float = 0.5,
    rho: float = 2.0,
    beta1: float = 0.85,
    beta2: float = 0.85,
    warmup_steps: int = 0,
    grouping: str = "array",
    importance: str = "elementwise",
    clipping: str = "elliptical",
    profile_noise_ratio: float = 5.0,
    clip_fn: str = "clip",
    automatic_r: float = DEFAULT_AUTOMATIC_R,
) -> optax.GradientTransformationExtraArgs:
    """ANADP: importance-weighted noise per parameter group (METHOD.md).

    With the default elliptical clipping a run has exactly DP-SGD's
    (epsilon, delta) for the same (q, sigma, T) (plus the profile release for
    `importance="private_profile"`); `clipping="global"` is the literal variant
    whose steps are only (sigma * min_k s_k)-private. `seed`: as for
    `dp_sgd_aggregate` (None: a secret key from the operating system).
    """
    return Mechanism(
        l2_norm_clip,
        noise_multiplier,
        expected_batch_size,
        seed,
        adaptive=True,
        clipping=clipping,
        gamma=gamma,
        rho=rho,
        warmup_steps=warmup_steps,
        grouping=grouping,
        importance=importance,
        beta1=beta1,
        beta2=beta2,
        profile_noise_ratio=profile_noise_ratio,
        clip_fn=clip_fn,
        automatic_r=automatic_r,
    ).as_transform()
