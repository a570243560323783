"""Per-example gradients and their clipped sums.

Two clipping modes (METHOD.md):

- "global" (DP-SGD, and the literal ANADP variant): each example's gradient is
  scaled to norm at most C; the sum is in parameter space.
- "elliptical" (ANADP's default): each example's gradient is whitened by the
  per-group noise scales, h = g / s, then clipped to ||h|| <= C; the sum is in
  whitened space, and the mechanism multiplies by s after adding noise.

Two clip functions map an example's (whitened, for elliptical) gradient h to
its contribution:

- "clip" (the default): h * min(1, C / ||h||);
- "automatic" (per-example normalisation, Bu et al.): C * h / (||h|| + r) for a
  small public r > 0; every example is rescaled, none passes unchanged, and a
  zero gradient stays zero (factor C / r, finite).

Both bound a contribution by ||hbar|| <= C, which is all the Gaussian
mechanism's sensitivity needs, so the privacy guarantee is the same for either.

In both modes every example's contribution to the returned sum has norm at most
C (in the space the noise is added in), and a row whose mask is 0 contributes
exactly zero. Nothing computed here is public: the sums must go through
`noise.Mechanism.release` (or `noise.privatize`) before anything derived from them
leaves the step.

Non-finite rows: an example whose gradient has a NaN or inf entry (an overflow
in its forward pass, a corrupt input) gets clip factor 0 and contributes
exactly nothing, to the sum and to the norm profile. Wherever a factor meets a
gradient, rows with factor 0 are selected away with `jnp.where` before any
product, because 0 * NaN is NaN: one bad example must not poison the step.
Dropping such an example is a data-dependent choice of the same kind as
clipping it (its contribution, 0, still has norm <= C), so the guarantee is
unchanged; how many were dropped is private, and is not counted.

Precision: every contraction here and in `anadp.ghost` that computes norms,
clip factors, whitened or clipped sums runs at `FULL_FLOAT32`. On GPUs a
float32 matmul defaults to TF32 (a 10-bit mantissa); then the norm that sets
a clip factor and the sum that factor scales are rounded differently, and a
contribution can exceed C (a probe saw 1.000027 C), which the sensitivity
argument does not allow. For the same reason the clip factors are never cast
to a gradient's dtype: gradients in bfloat16 (8-bit mantissa) are cast to
float32 before a factor scales them, and the norms, factors and sums are
float32 whatever the model computes in.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from anadp import _checks, allocation
from anadp.accounting import CLIPPING_MODES
from anadp.allocation import Groups

# How a (whitened) gradient h becomes a contribution of norm <= C (module docstring).
CLIP_FNS = ("clip", "automatic")
DEFAULT_AUTOMATIC_R = 0.01  # r of "automatic": public, small against typical norms

# The precision of every contraction on the norm / clip / whitening path (see
# the module docstring): full float32 passes, whatever the backend's default.
FULL_FLOAT32 = jax.lax.Precision.HIGHEST


class GradientSum(NamedTuple):
    """A batch's summed gradients (not private): what clipping hands to the mechanism.

    On the private path (`clipped_sum`, `clipped_grad_sum`, `anadp.ghost`) the
    per-example contributions are clipped, and only `noise.Mechanism.release`
    or `noise.privatize` may turn the sum into something public. Non-private
    training carries its plain (unclipped) gradient sum in the same type.

    Attributes:
      grads: the summed gradients, a tree like the params. Clipped: whitened
        (h) for elliptical clipping, raw (g) for global clipping.
      profile: [K] sum of per-example norm profiles u_i (each of norm <= 1), or
        None when no estimator needs it.
    """

    grads: Any
    profile: jax.Array | None = None


def add_gradient_sums(a: GradientSum, b: GradientSum) -> GradientSum:
    """The sum of two gradient sums (of the same parameters): gradients and profiles
    added. Refuses to add a sum that has a profile to one that has none."""
    if (a.profile is None) != (b.profile is None):
        raise ValueError("cannot add a clipped sum with a profile to one without")
    grads = jax.tree_util.tree_map(jnp.add, a.grads, b.grads)
    return GradientSum(grads, None if a.profile is None else a.profile + b.profile)


def check_clipping(clipping: str) -> None:
    _checks.one_of("clipping", clipping, CLIPPING_MODES)


def check_clip_fn(clip_fn: str, automatic_r: float = DEFAULT_AUTOMATIC_R) -> None:
    _checks.one_of("clip_fn", clip_fn, CLIP_FNS)
    # A traced r (inside jit) cannot be checked here; Mechanism and the config check theirs.
    if isinstance(automatic_r, numbers.Real) and not 0 < automatic_r < math.inf:
        raise ValueError(f"automatic_r={automatic_r} must be in (0, inf)")


def per_example_grads(loss_fn: Callable, params: Any, batch: Any) -> Any:
    """Gradients of `loss_fn(params, example)` for every example of `batch`.

    `loss_fn` takes one example (no batch axis); the result has a leading batch axis.
    """
    return jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)


def _per_leaf_sq_norms(grads: Any) -> list[jax.Array]:
    """For each leaf, the per-example squared norms, shape [B]."""
    return [
        jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
        for g in jax.tree_util.tree_leaves(grads)
    ]


def clipped_sum(
    per_example_grads: Any,
    scales: Any,
    *,
    l2_norm_clip: float,
    clipping: str,
    mask: jax.Array | None = None,
    groups: Groups | None = None,
    clip_fn: str = "clip",
    automatic_r: float = DEFAULT_AUTOMATIC_R,
) -> GradientSum:
    """Clips each example's gradient and sums over the batch.

    Args:
      per_example_grads: tree of arrays with a leading batch axis [B, ...].
      scales: tree with the gradient's structure, one positive scalar per leaf
        (the noise scale of the leaf's group); ignored by global clipping. None
        means all ones.
      l2_norm_clip: C.
      clipping: "elliptical" (clip ||g / s|| <= C) or "global" (clip ||g|| <= C).
      mask: [B], 1 for real rows and 0 for padding; padding contributes exactly 0.
      groups: if given, also sum the per-example norm profiles
        u_i = (||g_{i,1}||, ..., ||g_{i,K}||) / ||g_i|| (norm 1, or 0 for a zero
        gradient) for the `private_profile` estimator.
      clip_fn: "clip" (h * min(1, C / ||h||)) or "automatic" (C * h / (||h|| + r)).
      automatic_r: r > 0 of "automatic".

    Returns:
      A GradientSum. Each example adds at most C to the norm of `grads` (in the
      whitened space for elliptical clipping) and at most 1 to that of `profile`.
    """
    check_clipping(clipping)
    leaves, treedef = jax.tree_util.tree_flatten(per_example_grads)
    if scales is None:
        scale_leaves = [jnp.ones([], jnp.float32)] * len(leaves)
    else:
        scale_leaves = treedef.flatten_up_to(scales)
    sq_norms = _per_leaf_sq_norms(per_example_grads)
    factors = clip_factors(
        sq_norms, scale_leaves, l2_norm_clip=l2_norm_clip, clipping=clipping, mask=mask,
        clip_fn=clip_fn, automatic_r=automatic_r,
    )

    def weighted_sum(g, s):
        # Float32 operands: a factor rounded to a bfloat16 gradient's dtype could
        # scale a contribution past C.
        summed = jnp.einsum(
            "b,b...->...",
            factors,
            jnp.asarray(zero_dropped_rows(g, factors), jnp.float32),
            precision=FULL_FLOAT32,
            preferred_element_type=jnp.float32,
        )
        return summed / s if clipping == "elliptical" else summed

    summed = treedef.unflatten(
        [weighted_sum(g, s) for g, s in zip(leaves, scale_leaves)]
    )

    profile = None if groups is None else norm_profile(sq_norms, groups, mask)
    return GradientSum(summed, profile)


def clip_factors(
    sq_norms: list[jax.Array],
    scale_leaves: list[Any],
    *,
    l2_norm_clip: float,
    clipping: str,
    mask: jax.Array | None = None,
    clip_fn: str = "clip",
    automatic_r: float = DEFAULT_AUTOMATIC_R,
) -> jax.Array:
    """Per-example clip factors [B] from per-leaf squared norms (each [B]).

    With n = ||g / s|| (elliptical; ||g / s||^2 = sum_leaf ||g_leaf||^2 / s_leaf^2)
    or n = ||g|| (global): min(1, C / n) for clip_fn="clip", C / (n + r) for
    "automatic". Rows whose mask is 0, and rows whose norm is not
    finite (a NaN or inf in the gradient), get factor 0; apply the factors with
    `zero_dropped_rows`, never by multiplication alone. Shared by the vmap path
    here and the ghost-norm path (`anadp.ghost`).
    """
    check_clipping(clipping)
    check_clip_fn(clip_fn, automatic_r)
    if clipping == "elliptical":
        # ||g / s||^2 without materialising g / s: divide each leaf's squared norm.
        total_sq = sum(n / jnp.square(s) for n, s in zip(sq_norms, scale_leaves))
    else:
        total_sq = sum(sq_norms)
    norms = jnp.sqrt(total_sq)
    if clip_fn == "automatic":
        # r > 0 keeps a zero gradient's factor finite (C / r), so its contribution is 0.
        factors = l2_norm_clip / (norms + automatic_r)
    else:
        # min(1, C / ||.||), written so that a zero gradient gets factor 1, not nan.
        factors = l2_norm_clip / jnp.maximum(norms, l2_norm_clip)
    return jnp.where(_counted_rows(norms, mask), factors, 0.0)


def _counted_rows(norms: jax.Array, mask: jax.Array | None) -> jax.Array:
    """[B] bool: the row is real (mask 1) and its norm is finite."""
    counted = jnp.isfinite(norms)
    return counted if mask is None else counted & mask.astype(bool)


def zero_dropped_rows(x: jax.Array, factors: jax.Array) -> jax.Array:
    """`x` [B, ...] with the rows whose clip factor is 0 set to exactly 0.

    By selection, not multiplication: a dropped row (padding, or an example
    with a non-finite gradient) may hold NaN or inf, and 0 * NaN is NaN.
    """
    keep = (factors != 0).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x, jnp.zeros([], x.dtype))


def norm_profile(sq_norms: list[jax.Array], groups: Groups, mask: jax.Array | None = None) -> jax.Array:
    """[K] sum over unmasked rows of u_i = (||g_{i,1}||, ..., ||g_{i,K}||) / ||g_i||
    (0 for a zero gradient), from per-leaf squared norms (each [B]). A row
    whose norm is not finite adds 0."""
    group_norms = jnp.sqrt(allocation.group_sum(sq_norms, groups))  # [K, B]
    raw_norms = jnp.sqrt(sum(sq_norms))  # [B]
    unit = group_norms / jnp.where(raw_norms > 0, raw_norms, 1.0)
    # Selected, not weighted by the mask: a non-finite row's unit vector is NaN.
    return jnp.sum(jnp.where(_counted_rows(raw_norms, mask)[None, :], unit, 0.0), axis=1)


def clipped_grad_sum(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    scales: Any,
    *,
    l2_norm_clip: float,
    clipping: str,
    mask: jax.Array | None = None,
    microbatch_size: int | None = None,
    groups: Groups | None = None,
    clip_fn: str = "clip",
    automatic_r: float = DEFAULT_AUTOMATIC_R,
) -> GradientSum:
    """Clipped sum of per-example gradients, computed microbatch by microbatch.

    The memory path: per-example gradients exist for one microbatch at a time
    (peak memory grows with `microbatch_size`, not the batch), and their clipped
    sums are accumulated inside one `lax.scan`. Equal to
    `clipped_sum(per_example_grads(loss_fn, params, batch), ...)` up to the
    order of floating-point additions.

    Args:
      loss_fn: `loss_fn(params, example) -> scalar` on one example.
      batch: tree of arrays with a leading batch axis B.
      microbatch_size: must divide B; None processes the batch in one go.
      Other arguments: as for `clipped_sum`.
    """
    clip_args = dict(
        l2_norm_clip=l2_norm_clip, clipping=clipping, groups=groups, clip_fn=clip_fn, automatic_r=automatic_r
    )

    def one(micro_batch, micro_mask):
        grads = per_example_grads(loss_fn, params, micro_batch)
        return clipped_sum(grads, scales, mask=micro_mask, **clip_args)

    return sum_microbatches(one, params, batch, mask, microbatch_size, groups)


def sum_microbatches(
    one: Callable, params: Any, batch: Any, mask: jax.Array | None, microbatch_size: int | None,
    groups: Groups | None,
) -> GradientSum:
    """`one(batch, mask) -> GradientSum` over `batch` in one go, or microbatch by
    microbatch inside one `lax.scan`, the parts added (`add_gradient_sums`).

    The scan both clipping engines share (here and `anadp.ghost`): `params` gives
    the shapes of the float32 zero sums, `groups` those of the profile; a None
    mask counts every row; `microbatch_size` must divide the batch (None: one go).
    """
    batch_size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if mask is None:
        mask = jnp.ones([batch_size], jnp.float32)
    if microbatch_size is None or microbatch_size >= batch_size:
        return one(batch, mask)
    if batch_size % microbatch_size:
        raise ValueError(
            f"batch size {batch_size} is not a multiple of microbatch_size={microbatch_size}"
        )
    num_micro = batch_size // microbatch_size

    def split(x):
        x = jnp.asarray(x)
        return x.reshape((num_micro, microbatch_size) + x.shape[1:])

    def body(total, micro):
        return add_gradient_sums(total, one(*micro)), None

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    init = GradientSum(zeros, None if groups is None else jnp.zeros(groups.num_groups, jnp.float32))
    total, _ = jax.lax.scan(body, init, (jax.tree_util.tree_map(split, batch), split(mask)))
    return total
