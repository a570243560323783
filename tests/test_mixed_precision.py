"""Mixed precision (`train.dtype=bfloat16`): float32 parameters, bfloat16 activations,
and a mechanism that is float32 throughout, so that the DP bound holds as in float32.

Tolerances (measured on a CPU with tiny random models; see each test):
- the bfloat16 loss is within LOSS_RTOL = 2e-3 (relative) of the float32 loss,
  before and after each of 5 non-private Adam steps on a fixed batch (measured:
  at most 1.3e-4);
- the two clipping engines agree in bfloat16 to GHOST_VMAP_RTOL = 1e-2 of each
  leaf's largest entry, or of 5% of the largest leaf's if that is more
  (measured: at most 3.9e-3; float32: 1e-5 of the leaf, in test_ghost.py). They
  differ where bfloat16 rounds: the vmap engine's per-example weight and bias
  gradients are bfloat16 products and sums, the ghost engine contracts the
  same bfloat16 records in float32.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from launching import launch
from tiny_models import tiny_batch, tiny_model

import anadp.models as M
from anadp import checkpoint, clipping, ghost, step_functions, train

LOSS_RTOL = 2e-3
GHOST_VMAP_RTOL = 1e-2
# A leaf's batch sum may cancel (its entries far below each example's): bfloat16's
# per-example rounding then looks large against the leaf's own size, so small
# leaves are measured against this share of the largest leaf.
SMALL_LEAF_FLOOR = 5e-2
BOUND_SLACK = 1e-6  # every whitened contribution <= C (1 + BOUND_SLACK), as in float32

# XLA's CPU optimisations cost most of these tests' time and nothing they check.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_fast(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def uneven_scales(trainable, seed: int = 5):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda _: jnp.float32(rng.uniform(0.3, 3.0)), trainable)


def contribution_norms(tree, rows: int) -> np.ndarray:
    """[rows] float64 norms of per-row trees (a leading axis of `rows`)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)).reshape(rows, -1), axis=1) for x in leaves))


# --- the model ---------------------------------------------------------------


def test_bfloat16_model_computes_in_bfloat16_and_keeps_float32_parameters():
    model, params = tiny_model("bert", "full", dtype="bfloat16")
    batch = tiny_batch("bert")
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    records = ghost.modeling.RECORD
    logits, state = jax.eval_shape(lambda p: model.apply({"params": p}, *args, mutable=[records]), params)
    assert logits.dtype == jnp.float32  # cast before the cross-entropy
    hidden = jax.eval_shape(lambda p: model.apply({"params": p}, *args, method=model.encode), params)
    assert hidden.dtype == jnp.bfloat16
    layer = state[records]["encoder"]["layer_0"]
    assert layer["attention"]["query"]["dense_in"][0].dtype == jnp.bfloat16
    assert layer["attention"]["query"]["lora_z"][0].dtype == jnp.bfloat16
    assert layer["norm"]["norm_xhat"][0].dtype == jnp.float32  # LayerNorm statistics in float32
    grads = jax.eval_shape(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, *args))), params)
    assert {x.dtype for x in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype='float16' is not one of"):
        M.from_config(M.tiny_bert_config(vocab_size=40), 2, dtype="float16")
    with pytest.raises(ValueError, match="is not one of"):
        M.compute_dtype("bf16")
    assert M.compute_dtype("bfloat16") == jnp.bfloat16 and M.compute_dtype(jnp.float32) == jnp.float32


def test_config_validation_of_the_dtype():
    from configs import base

    config = base.get_config()
    assert config.train.dtype == "float32"
    config.train.dtype = "bfloat16"
    train.validate_config(config)
    config.train.dtype = "float16"
    with pytest.raises(ValueError, match=r"config.train.dtype='float16' is invalid: must be one of"):
        train.validate_config(config)


# --- (a) the DP bound --------------------------------------------------------


@pytest.mark.parametrize(
    "kind,finetune,engine",
    [("bert", "full", "ghost"), ("bert", "lora", "ghost"), ("bert", "full", "vmap"), ("bert", "lora", "vmap"),
     ("roberta", "full", "ghost")],
)
def test_each_whitened_contribution_is_at_most_c_in_bfloat16(kind, finetune, engine):
    """Tiny BERT (and RoBERTa, ghost) in bfloat16, one example at a time (all
    others masked), elliptical clipping with uneven scales, C below every
    example's whitened norm: every contribution's norm is <= C (1 + 1e-6), for
    both clip functions. A clip factor rounded to bfloat16 would break this by
    up to 2^-9, and so would a ghost norm and sum that read a record at two
    precisions (1.0007 C was seen before `ghost._pinned`)."""
    model, params = tiny_model(kind, finetune, dtype="bfloat16")
    trainable, frozen = M.partition(params, finetune)
    batch = tiny_batch(kind)
    scales = uneven_scales(trainable)
    one_at_a_time = jnp.eye(8, dtype=jnp.float32)
    loss_fn = step_functions.make_example_loss(model, frozen, False)

    def one(trainable, frozen, batch, scales, mask, clip, clip_fn):
        kwargs = dict(mask=mask, l2_norm_clip=clip, clipping="elliptical", clip_fn=clip_fn)
        if engine == "ghost":
            return ghost.clipped_grad_sum(model, trainable, frozen, batch, scales, **kwargs).grads
        return clipping.clipped_grad_sum(loss_fn, trainable, batch, scales, **kwargs).grads

    def contributions(trainable, frozen, batch, scales, clip):
        return {fn: jax.vmap(lambda m, fn=fn: one(trainable, frozen, batch, scales, m, clip, fn))(one_at_a_time)
                for fn in clipping.CLIP_FNS}

    compiled = jax.jit(contributions).lower(trainable, frozen, batch, scales, 1.0).compile(
        compiler_options=FAST_COMPILE)

    def norms(clip):
        out = compiled(trainable, frozen, batch, scales, clip)
        assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(out))
        return {fn: contribution_norms(tree, 8) for fn, tree in out.items()}

    whitened = norms(1e9)["clip"]  # factor 1: the whitened gradients themselves
    assert np.all(np.isfinite(whitened)) and np.all(whitened > 0)
    clip = 0.5 * float(np.min(whitened))
    got = norms(clip)
    for fn in clipping.CLIP_FNS:
        assert np.all(got[fn] <= clip * (1 + BOUND_SLACK)), (fn, got[fn] / clip - 1)
    assert np.all(got["clip"] >= clip * (1 - 1e-5))


def test_bfloat16_gradients_are_clipped_in_float32():
    """`clipping.clipped_sum` of per-example gradients that are themselves
    bfloat16 (a model trained in bfloat16 parameters): the factors meet float32
    copies of them, so each contribution is still <= C (1 + 1e-6), and the sum
    is float32."""
    rng = np.random.default_rng(0)
    rows = 64
    grads = {"w": jnp.asarray(rng.standard_normal((rows, 31, 7)), jnp.bfloat16),
             "b": jnp.asarray(rng.standard_normal((rows, 7)), jnp.bfloat16)}
    scales = {"w": jnp.float32(0.7), "b": jnp.float32(1.9)}
    clip = 0.37  # far below every norm: every row is scaled by a factor < 1

    def contributions(grads):
        def one(mask):
            return clipping.clipped_sum(grads, scales, l2_norm_clip=clip, clipping="elliptical", mask=mask).grads
        return jax.vmap(one)(jnp.eye(rows, dtype=jnp.float32))

    out = jax.jit(contributions)(grads)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(out))
    norms = contribution_norms(out, rows)
    assert np.all(norms <= clip * (1 + BOUND_SLACK)), norms / clip - 1
    assert np.all(norms >= clip * (1 - 1e-5))


# --- (b) the bfloat16 loss tracks the float32 loss ---------------------------


def non_private_losses(dtype: str, steps: int = 5) -> list[float]:
    """The mean loss of one fixed batch before and after each of `steps`
    non-private Adam steps (full fine-tuning of tiny-bert's shapes, through the
    training loop's own step functions)."""
    from configs import base

    config = base.get_config()
    config.privacy.method = "non_private"
    config.train.learning_rate = 3e-3
    vocab = 30522
    model, params = M.from_config(M.tiny_bert_config(vocab), 3, seed=0, dtype=dtype)
    trainable, frozen = M.partition(params, "full")
    optimizer = train.make_optimizer(config.train, steps)
    fns = train.make_step_functions(model, None, optimizer, config)
    batch = tiny_batch("bert", rows=16, length=24, vocab=vocab)
    mask = jnp.ones(16, jnp.float32)
    state = train.TrainState(trainable, optimizer.init(trainable), ())

    def loss(state):
        logits = fns.predict(state.trainable, frozen, batch)
        return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])))

    losses = [loss(state)]
    for _ in range(steps):
        summed = fns.accumulate(state.trainable, frozen, None, batch, mask)
        state = fns.apply(state, summed, jnp.float32(16))
        losses.append(loss(state))
    assert {x.dtype for x in jax.tree_util.tree_leaves((state.trainable, state.opt_state))
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    return losses


def test_bfloat16_loss_tracks_float32_over_five_steps():
    """Relative difference <= LOSS_RTOL at every step (measured: at most 1.3e-4),
    while the float32 loss itself falls by more than ten times that tolerance
    (measured: 13%)."""
    reference, mixed = non_private_losses("float32"), non_private_losses("bfloat16")
    relative = np.abs(np.array(mixed) - np.array(reference)) / np.array(reference)
    assert np.all(relative <= LOSS_RTOL), relative
    assert reference[0] - reference[-1] > 10 * LOSS_RTOL * reference[0], reference


# --- (c) ghost == vmap in bfloat16 ---------------------------------------------


@pytest.mark.parametrize(
    "kind,finetune,mode,microbatch_size,use_mask",
    [
        ("bert", "full", "elliptical", 4, True),
        ("bert", "lora", "global", None, False),
        ("roberta", "full", "global", 4, True),
    ],
)
def test_ghost_equals_vmap_in_bfloat16(kind, finetune, mode, microbatch_size, use_mask):
    """Within GHOST_VMAP_RTOL of each leaf's largest entry, or of
    SMALL_LEAF_FLOOR times the largest leaf's (the attention key bias, whose true
    gradient is 0, and leaves whose batch sums cancel). The clip norm is the
    median per-example norm, so some rows are clipped and some are not."""
    model, params = tiny_model(kind, finetune, dtype="bfloat16")
    trainable, frozen = M.partition(params, finetune)
    batch = tiny_batch(kind)
    mask = jnp.asarray(np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)) if use_mask else None
    scales = uneven_scales(trainable, seed=3)
    loss_fn = step_functions.make_example_loss(model, frozen, False)

    def run(trainable, frozen, batch, scales):
        per_example = clipping.per_example_grads(loss_fn, trainable, batch)
        sq_norms = clipping._per_leaf_sq_norms(per_example)
        if mode == "elliptical":
            sq_norms = [n / jnp.square(s) for n, s in zip(sq_norms, jax.tree_util.tree_leaves(scales))]
        clip = jnp.median(jnp.sqrt(sum(sq_norms)))
        kwargs = dict(l2_norm_clip=clip, clipping=mode, mask=mask)
        reference = clipping.clipped_sum(per_example, scales, **kwargs)
        got = ghost.clipped_grad_sum(model, trainable, frozen, batch, scales, microbatch_size=microbatch_size,
                                     **kwargs)
        return reference.grads, got.grads

    reference, got = run_fast(run, trainable, frozen, batch, scales)
    leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
    tree_scale = max(float(np.max(np.abs(np.asarray(x)))) for _, x in leaves)
    worst = 0.0
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(got), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert b.dtype == np.float32
        yardstick = max(float(np.max(np.abs(a))), SMALL_LEAF_FLOOR * tree_scale)
        error = float(np.max(np.abs(a - b))) / yardstick
        worst = max(worst, error)
        assert error <= GHOST_VMAP_RTOL, (jax.tree_util.keystr(path), error)
    print(f"ghost vs vmap in bfloat16, worst relative error {worst:.2e}")


# --- (d) end to end ------------------------------------------------------------



def test_bfloat16_training_runs_end_to_end(tmp_path):
    """launch.py, tiny-bert, ANADP with the ghost engine (the defaults), 2 steps
    in bfloat16: a summary, a finite loss, and float32 parameters in the checkpoint."""
    workdir = tmp_path / "run"
    result = launch(workdir, "--config.train.steps=2", "--config.train.eval_every=2",
                    "--config.train.dtype=bfloat16", env_extra={"ANADP_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["config"]["train"]["dtype"] == "bfloat16" and summary["steps"] == 2
    assert np.isfinite(summary["eval"]["loss"]) and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    state = checkpoint.load_checkpoint(str(workdir))["state"]
    floats = [x for x in jax.tree_util.tree_leaves(state["trainable"]) if np.issubdtype(np.asarray(x).dtype,
                                                                                         np.floating)]
    assert floats and all(np.asarray(x).dtype == np.float32 for x in floats)
