"""The jitted device pieces of one training step: `accumulate` (the clipped
gradient sum of one pass; for non-private training the plain gradient sum),
`apply` (the mechanism's release and the optimiser update) and `predict`
(logits for evaluation). `train.train_step` drives them from the host.

The per-example loss (`make_example_loss`) is the one both clipping engines
differentiate (`clipping.clipped_grad_sum` here, `ghost.clipped_grad_sum` its
ghost-norm equivalent)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from anadp import ghost, models, sharding
from anadp.clipping import GradientSum, add_gradient_sums, clipped_grad_sum
from anadp.noise import Mechanism


class TrainState(NamedTuple):
    trainable: Any
    opt_state: Any
    mechanism: Any  # MechanismState, or () for non-private training


def make_example_loss(model, frozen: Any, dropout: bool) -> Callable:
    """Cross-entropy of one example (no batch axis), a function of the trainable params."""

    def loss_fn(trainable, example):
        params = models.combine(trainable, frozen)
        rngs = {"dropout": example["dropout_key"]} if dropout else None
        logits = model.apply(
            {"params": params},
            example["input_ids"][None],
            example["attention_mask"][None],
            example["token_type_ids"][None],
            deterministic=not dropout,
            rngs=rngs,
        )[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, example["labels"])

    return loss_fn


@dataclasses.dataclass
class StepFunctions:
    """The jitted pieces of a step. One compilation per batch shape (bucket)."""

    accumulate: Callable  # (trainable, frozen, scales, batch, mask) -> GradientSum (clipped, or plain)
    add: Callable  # (running sum, pass sum) -> their sum; donates the running sum
    apply: Callable  # (state, summed, realised_count) -> state
    predict: Callable  # (trainable, frozen, batch) -> logits


def make_step_functions(model, mechanism: Mechanism | None, optimizer, config) -> StepFunctions:
    """The frozen parameters are an argument, not a closure: captured, they would be
    baked into the compiled program as constants (slow to compile, duplicated in memory)."""
    microbatch = config.train.microbatch_size

    if mechanism is None:

        def accumulate(trainable, frozen, scales, batch, mask):
            del scales
            loss_fn = make_example_loss(model, frozen, config.model.dropout)

            def total_loss(p):
                losses = jax.vmap(loss_fn, in_axes=(None, 0))(p, batch)
                return jnp.sum(losses * mask)

            return GradientSum(jax.grad(total_loss)(trainable))

        def apply(state, summed, realised_count):
            mean = jax.tree_util.tree_map(lambda g: g / jnp.maximum(realised_count, 1.0), summed.grads)
            updates, opt_state = optimizer.update(mean, state.opt_state, state.trainable)
            return TrainState(optax.apply_updates(state.trainable, updates), opt_state, ())

    else:

        engine = config.train.clipping_engine  # one of _validate.CLIPPING_ENGINES

        def accumulate(trainable, frozen, scales, batch, mask):
            clip_args = {
                "l2_norm_clip": mechanism.l2_norm_clip,
                "clipping": mechanism.clipping,
                "mask": mask,
                "microbatch_size": microbatch,
                "groups": mechanism.profile_groups(trainable),
                "clip_fn": mechanism.clip_fn,
                "automatic_r": mechanism.automatic_r,
            }
            if engine == "ghost":
                # Ghost norms + book-keeping: no per-example gradients of large matrices.
                return ghost.clipped_grad_sum(model, trainable, frozen, batch, scales, **clip_args)
            loss_fn = make_example_loss(model, frozen, config.model.dropout)
            return clipped_grad_sum(loss_fn, trainable, batch, scales, **clip_args)

        def apply(state, summed, realised_count):
            del realised_count  # DP: the denominator is the expected batch size, never this
            released, mech_state = mechanism.release(summed, state.mechanism, state.trainable)
            updates, opt_state = optimizer.update(released, state.opt_state, state.trainable)
            return TrainState(optax.apply_updates(state.trainable, updates), opt_state, mech_state)

    def predict(trainable, frozen, batch):
        params = models.combine(trainable, frozen)
        return model.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            deterministic=True,
        )

    return StepFunctions(
        # Each device clips its own rows; the clipped sums are added across devices.
        accumulate=jax.jit(sharding.sum_over_devices(accumulate, num_replicated=3)),
        # One program per pass, not one per parameter leaf. Besides the dispatch
        # cost, XLA:CPU with several devices can deadlock when a device has more
        # than its 32 in-flight computations queued behind a collective (the
        # leafwise adds of a full fine-tuning pass were; tests/test_sharding.py).
        add=jax.jit(add_gradient_sums, donate_argnums=(0,)),
        apply=jax.jit(apply, donate_argnums=(0,)),
        predict=jax.jit(predict),
    )
