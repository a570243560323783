"""Ghost-norm / book-keeping clipping: the clipped gradient sum of
`clipping.clipped_grad_sum` without per-example gradients of large matrices.

The vmap path materialises every example's full gradient (B x P floats per
microbatch: for MiniLM's 11.7M-float word embedding alone, 1.5 GB at B = 32).
Here, for each microbatch:

1. One forward pass of the batched model records, for every module that owns
   a trainable leaf, the input of its parameters (Flax ``sow``: a Dense
   input x, a LoRA hidden z = x @ lora_a, a LayerNorm's normalised input, an
   Embed's ids), and one backward pass gives the cotangent of each such
   module's output (Flax ``perturb``; the loss is the sum of the per-example
   losses, so each example's cotangents are its own). Only the perturbations
   are differentiated, so the weight-gradient matmuls are never built.
2. Per-example squared norms of every trainable leaf, from those records
   (X: [B, T, in] input, D: [B, T, out] output cotangent, T the token axis, or
   1 for the pooled head):

   - Dense kernel ``||X_i^T D_i||_F^2``: either by Gram matrices,
     ``sum_{t,t'} (X_i X_i^T)_{tt'} (D_i D_i^T)_{tt'}`` (cost T^2 (in + out)),
     or by materialising ``X_i^T D_i`` (cost T in out), whichever is cheaper
     for the layer's shape; bias ``||sum_t D_i,t||^2``;
   - LoRA: ``lora_a``'s gradient is ``X^T dZ`` (dZ the cotangent of z),
     ``lora_b``'s is ``Z^T (scale * D)``;
   - LayerNorm scale ``||sum_t xhat_i,t * D_i,t||^2``, bias ``||sum_t D_i,t||^2``;
   - Embed: ``sum_{t,t'} [id_t == id_t'] <D_t, D_t'>`` (ids may repeat: words,
     and RoBERTa's padding positions), or, for a table with fewer rows than
     tokens (token types), the per-example [rows, features] gradient.
3. Clip factors from those norms exactly as `clipping.clip_factors` (global,
   or elliptical with per-leaf scales; "clip" or "automatic"; masked rows 0)
   and, if asked, the norm profile (`clipping.norm_profile`).
4. Book-keeping: the clipped sum of each leaf straight from the records and
   the cotangents scaled by the clip factors (``X^T diag(c) D`` per Dense,
   scatter-add for embeddings), no second backward pass; divided by the scales
   for elliptical clipping, as `clipping.clipped_sum` does.

Steps 2 and 4, module by module, are the rules of `anadp.ghost_rules`; this
module plans, records, clips and scans.

An example whose loss is not finite has NaN or inf in its records or
cotangents, hence a non-finite squared norm for some leaf, hence clip factor 0
(`clipping.clip_factors`). Its rows of every record and cotangent are then
selected to 0 (`clipping.zero_dropped_rows`) before they meet a factor or
another array, both operands of a product included: it contributes exactly
nothing, as in the vmap path.

Every contraction of steps 2 to 4 runs at full float32 (`ghost_rules._einsum`,
`clipping.FULL_FLOAT32`): under TF32, a GPU's default, a norm from Gram
matrices and the book-kept sum that its clip factor scales are rounded
differently, and a contribution can exceed C.

Mixed precision: a bfloat16 model (``dtype=jnp.bfloat16``) records bfloat16
inputs and hands back bfloat16 cotangents. Every record and cotangent is cast
to float32 (`ghost_rules._f32`) before it enters a norm or a book-keeping
contraction, and the clip factors are never cast down: a factor rounded to
bfloat16 (8-bit mantissa) could scale a contribution to C (1 + 2^-9), past the
bound. The norms
and sums are then those of the bfloat16 model's own per-example gradients,
computed in float32.

The norm of an example and its book-kept contribution must be computed from
the same numbers. XLA may keep a bfloat16 value in float32 where it sees fit
(``xla_allow_excess_precision``, on by default): it drops a round trip
float32 -> bfloat16 -> float32 in one consumer of a record and not in another
(one that selects rows first), and then the norm sees the unrounded value and
the sum the rounded one; a probe saw contributions of 1.0007 C. So, when any
of them is narrower than float32, the records and cotangents pass through one
`jax.lax.optimization_barrier` (`_pinned`) before anything reads them: every
consumer then reads the same materialised values.

The loss is the training loop's (`step_functions.make_example_loss`): softmax cross
entropy of each example, dropout off. A trainable leaf whose module has no
hook, or a module applied more than once, is an error, never a silent
approximation. Everything returned is as private (i.e. not at all) as
`clipping.clipped_grad_sum`'s result: it must go through `noise.release`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from anadp import allocation
from anadp import clipping as clipping_lib
from anadp.allocation import Groups
from anadp.clipping import GradientSum
from anadp.ghost_rules import LEAVES_BY_HOOK, RULES, Grams
from anadp.models import modeling
from anadp.models.lora import combine, flatten_params, unflatten_params

KERNEL_NORMS = ("auto", "gram", "direct")


def _narrower_than_float32(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32


def _pinned(tree: Any) -> Any:
    """`tree` through one optimisation barrier, so that every reader sees the same
    materialised values (module docstring: excess precision). An array that
    appears several times (the input that the query, key and value projections
    all record) goes through once and stays one object, for `ghost_rules.Grams`' cache.
    Only a tree with arrays narrower than float32 needs it (their float32 round
    trips are what XLA may drop): a float32 tree is returned as it is, and a
    float32 model's program is unchanged."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not any(_narrower_than_float32(x) for x in leaves):
        return tree
    unique = list({id(x): x for x in leaves}.values())
    pinned = dict(zip([id(x) for x in unique], jax.lax.optimization_barrier(unique)))
    return treedef.unflatten([pinned[id(x)] for x in leaves])


# ----------------------------------------------------------------------------
# Planning: which module each trainable leaf belongs to, and what it needs.
# ----------------------------------------------------------------------------


def _subtree(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _plan(leaf_paths: list[tuple[str, ...]], perturbation_shapes: Any) -> dict:
    """{module path: (hook, {leaf name: flat index})}; ValueError for a leaf
    the engine cannot differentiate."""
    modules: dict[tuple[str, ...], tuple[str, dict[str, int]]] = {}
    for index, path in enumerate(leaf_paths):
        module, leaf = path[:-1], path[-1]
        node = _subtree(perturbation_shapes, module)
        hooks = [] if not isinstance(node, Mapping) else [h for h in LEAVES_BY_HOOK if h in node]
        hook = next((h for h in hooks if leaf in LEAVES_BY_HOOK[h]), None)
        if len(hooks) != 1 or hook is None:
            raise ValueError(
                f"ghost clipping cannot differentiate the trainable leaf {'/'.join(path)}: its "
                f"module records no known ghost hook for {leaf!r} (hooks found: {hooks or 'none'}); "
                "use the vmap clipping engine or add a hook in anadp/models/modeling.py"
            )
        if module not in modules:
            modules[module] = (hook, {})
        modules[module][1][leaf] = index
    return modules


def _needed_perturbations(modules: dict) -> list[tuple[str, ...]]:
    needed = []
    for module, (hook, leaves) in modules.items():
        if hook == modeling.DENSE_OUT:
            if set(leaves) & {"kernel", "bias", "lora_b"}:
                needed.append(module + (modeling.DENSE_OUT,))
            if "lora_a" in leaves:
                needed.append(module + (modeling.LORA_Z_OUT,))
        else:
            needed.append(module + (hook,))
    return needed


def _single_record(records: Any, module: tuple[str, ...], name: str) -> jax.Array | None:
    node = _subtree(records, module)
    if not isinstance(node, Mapping) or name not in node:
        return None
    values = node[name]
    if len(values) != 1:
        raise ValueError(
            f"module {'/'.join(module)} was applied {len(values)} times in one forward pass; "
            "ghost clipping needs each parameter used once (use the vmap clipping engine)"
        )
    return values[0]


# ----------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------


def _records_and_cotangents(model, params, leaf_paths, batch) -> tuple[dict, Any, Any]:
    """The plan (`_plan`), the records and the output cotangents of one microbatch:
    one forward and one backward pass of the model, nothing of the clipping."""
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def apply(variables, mutable):
        return model.apply(variables, *inputs, deterministic=True, mutable=mutable)

    shapes = jax.eval_shape(lambda p: apply({"params": p}, [modeling.PERTURB])[1], params)
    shapes = shapes.get(modeling.PERTURB, {})
    modules = _plan(leaf_paths, shapes)
    needed = _needed_perturbations(modules)
    all_zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in flatten_params(shapes).items()}
    wanted = {k: all_zeros[k] for k in needed}

    def summed_loss(perturbations):
        variables = {"params": params, modeling.PERTURB: unflatten_params({**all_zeros, **perturbations})}
        logits, state = apply(variables, [modeling.RECORD])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return jnp.sum(losses), state[modeling.RECORD]

    # Only the perturbations are differentiated: activation cotangents, no weight gradients.
    cotangents, records = jax.grad(summed_loss, has_aux=True)(wanted)
    return modules, records, unflatten_params(cotangents)


def _one_pass(
    model,
    params,
    leaf_paths,
    scale_leaves,
    batch,
    mask,
    *,
    l2_norm_clip: float,
    clipping_mode: str,
    groups: Groups | None,
    kernel_norm: str,
    clip_fn: str,
    automatic_r: float,
) -> tuple[list[jax.Array], jax.Array | None]:
    """Clipped sums (one per trainable leaf, flattening order) and profile for one microbatch."""
    modules, records, cotangents = _records_and_cotangents(model, params, leaf_paths, batch)
    records, cotangents = _pinned((records, cotangents))
    grams = Grams()
    sq_norms: list[jax.Array | None] = [None] * len(leaf_paths)
    finishers: list[tuple[dict[str, int], Callable]] = []
    for module, (hook, leaves) in modules.items():
        node = _subtree(records, module) or {}
        module_records = {
            name: _single_record(records, module, name) for name in node if not isinstance(node[name], Mapping)
        }
        module_cotangents = {
            k: v for k, v in (_subtree(cotangents, module) or {}).items() if not isinstance(v, Mapping)
        }
        sq, finish = RULES[hook](
            leaves, module_records, module_cotangents, _subtree(params, module), grams, kernel_norm
        )
        for leaf, index in leaves.items():
            sq_norms[index] = sq[leaf]
        finishers.append((leaves, finish))

    factors = clipping_lib.clip_factors(
        sq_norms, scale_leaves, l2_norm_clip=l2_norm_clip, clipping=clipping_mode, mask=mask,
        clip_fn=clip_fn, automatic_r=automatic_r,
    )
    sums: list[jax.Array | None] = [None] * len(leaf_paths)
    for leaves, finish in finishers:
        out = finish(factors)
        for leaf, index in leaves.items():
            s = scale_leaves[index]
            sums[index] = out[leaf] / s if clipping_mode == "elliptical" else out[leaf]
    profile = None if groups is None else clipping_lib.norm_profile(sq_norms, groups, mask)
    return sums, profile


def clipped_grad_sum(
    model,
    trainable: Any,
    frozen: Any,
    batch: Mapping[str, Any],
    scales: Any,
    *,
    l2_norm_clip: float,
    clipping: str,
    mask: jax.Array | None = None,
    microbatch_size: int | None = None,
    groups: Groups | None = None,
    dropout: bool = False,
    kernel_norm: str = "auto",
    clip_fn: str = "clip",
    automatic_r: float = clipping_lib.DEFAULT_AUTOMATIC_R,
) -> GradientSum:
    """`clipping.clipped_grad_sum` of the training loop's per-example loss, by
    ghost norms and book-keeping (see the module docstring).

    Args:
      model: the `EncoderClassifier`.
      trainable, frozen: the two halves of `models.partition`.
      batch: the training loop's batch: input_ids, attention_mask,
        token_type_ids [B, T] and labels [B].
      scales: one positive scalar per trainable leaf (elliptical clipping), or None.
      dropout: must be False (the engine differentiates the deterministic model;
        per-example dropout needs the vmap engine).
      kernel_norm: "auto" (per layer, the cheaper of Gram matrices and
        materialised per-example kernel gradients), "gram" or "direct"
        (forced, for tests).
      Other arguments: as for `clipping.clipped_grad_sum`.

    Returns:
      A GradientSum equal to `clipping.clipped_grad_sum(step_functions.make_example_loss(model,
      frozen, False), trainable, batch, scales, ...)` up to floating-point rounding.
    """
    clipping_lib.check_clipping(clipping)
    clipping_lib.check_clip_fn(clip_fn, automatic_r)
    if dropout or "dropout_key" in batch:
        raise ValueError(
            "ghost clipping differentiates the deterministic model; training with dropout "
            "(config.model.dropout) needs train.clipping_engine='vmap'"
        )
    if kernel_norm not in KERNEL_NORMS:
        raise ValueError(f"kernel_norm={kernel_norm!r} is not one of {KERNEL_NORMS}")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    flat, treedef = jax.tree_util.tree_flatten_with_path(trainable)
    if not flat:
        raise ValueError("no trainable parameters")
    leaf_paths = allocation.leaf_paths(trainable)
    if scales is None:
        scale_leaves = [jnp.ones([], jnp.float32)] * len(flat)
    else:
        scale_leaves = treedef.flatten_up_to(scales)
    params = combine(trainable, frozen)

    def one(micro_batch, micro_mask):
        sums, profile = _one_pass(
            model, params, leaf_paths, scale_leaves, micro_batch, micro_mask,
            l2_norm_clip=l2_norm_clip, clipping_mode=clipping, groups=groups, kernel_norm=kernel_norm,
            clip_fn=clip_fn, automatic_r=automatic_r,
        )
        return GradientSum(treedef.unflatten(sums), profile)

    return clipping_lib.sum_microbatches(one, trainable, batch, mask, microbatch_size, groups)
