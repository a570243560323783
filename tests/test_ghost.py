"""Ghost-norm / book-keeping clipping against the vmap path (`clipping.clipped_grad_sum`
with the training loop's per-example loss), on tiny random BERT and RoBERTa models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_batch, tiny_model

import anadp.models as M
from anadp import _validate, allocation, clipping, ghost, step_functions, train

RTOL = 1e-5


# XLA's CPU backend optimisations cost most of these tests' time and nothing of
# what they check (both engines are compiled alike).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_fast(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def compare(kind, finetune, mode, *, microbatch_size, use_mask: bool, grouping, layers=1, pooling="cls",
            clip_fn="clip"):
    """The ghost engine against `clipping.clipped_grad_sum` without microbatches
    (i.e. `clipped_sum(per_example_grads(...))`), in one compiled program; the
    clip norm is the median per-example gradient norm (some rows clipped, some not)."""
    model, params = tiny_model(kind, finetune, layers, pooling)
    trainable, frozen = M.partition(params, finetune)
    batch = tiny_batch(kind)
    mask = jnp.asarray(np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)) if use_mask else None
    groups = None if grouping is None else allocation.make_groups(trainable, grouping)
    rng = np.random.default_rng(3)
    scales = jax.tree_util.tree_map(lambda _: jnp.float32(rng.uniform(0.5, 2.0)), trainable)
    loss_fn = step_functions.make_example_loss(model, frozen, False)

    def run(trainable, frozen, batch, scales):
        per_example = clipping.per_example_grads(loss_fn, trainable, batch)
        sq_norms = clipping._per_leaf_sq_norms(per_example)
        if mode == "elliptical":
            norms = jnp.sqrt(sum(n / jnp.square(s) for n, s in zip(sq_norms, jax.tree_util.tree_leaves(scales))))
        else:
            norms = jnp.sqrt(sum(sq_norms))
        clip = jnp.median(norms)
        kwargs = dict(l2_norm_clip=clip, clipping=mode, mask=mask, groups=groups, clip_fn=clip_fn)
        ref = clipping.clipped_sum(per_example, scales, **kwargs)
        got = ghost.clipped_grad_sum(model, trainable, frozen, batch, scales, microbatch_size=microbatch_size, **kwargs)
        return norms, clip, ref, got

    norms, clip, ref, got = run_fast(run, trainable, frozen, batch, scales)
    assert np.min(norms) < clip < np.max(norms) and np.all(np.isfinite(norms))
    assert_clipped_sums_equal(ref, got, f"{kind}/{finetune}/{mode}/{clip_fn}")


def assert_clipped_sums_equal(ref, got, where):
    """Every leaf within RTOL of its own largest entry: ||got - ref||_inf <=
    RTOL * ||ref||_inf. A leaf whose true gradient is zero (the attention key
    bias: softmax ignores a constant shift of a query's scores) holds rounding
    noise only, so its yardstick is at least 1e-3 of the largest leaf."""
    ref_leaves = jax.tree_util.tree_flatten_with_path(ref.grads)[0]
    got_leaves, got_def = jax.tree_util.tree_flatten(got.grads)
    assert got_def == jax.tree_util.tree_structure(ref.grads)
    tree_scale = max(float(np.max(np.abs(np.asarray(x)))) for _, x in ref_leaves)
    assert tree_scale > 0
    for (path, a), b in zip(ref_leaves, got_leaves):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and b.dtype == np.float32
        yardstick = max(float(np.max(np.abs(a))), 1e-3 * tree_scale)
        error = float(np.max(np.abs(a - b)))
        assert error <= RTOL * yardstick, (where, jax.tree_util.keystr(path), error / yardstick)
    if ref.profile is None:
        assert got.profile is None
    else:
        np.testing.assert_allclose(np.asarray(got.profile), np.asarray(ref.profile), rtol=RTOL, atol=1e-6)


# Each fine-tuning mode meets both clipping modes, both models, masks,
# microbatches and profiles across the cases.
@pytest.mark.parametrize(
    "kind,finetune,mode,microbatch_size,use_mask,grouping,layers",
    [
        ("bert", "full", "elliptical", 4, True, "array", 2),
        ("bert", "lora", "global", None, True, None, 1),
        ("bert", "bias", "elliptical", 2, False, "layer", 1),
        ("roberta", "full", "global", None, False, "layer", 1),
        ("roberta", "lora", "elliptical", 4, True, "layer", 2),
        ("roberta", "bias", "global", 4, True, None, 1),
        ("bert", "frozen_embeddings", "elliptical", 4, True, "layer", 1),
    ],
)
def test_ghost_equals_vmap(kind, finetune, mode, microbatch_size, use_mask, grouping, layers):
    compare(kind, finetune, mode, microbatch_size=microbatch_size, use_mask=use_mask, grouping=grouping,
            layers=layers)


# Mean pooling (a masked mean, no pooler) with each mode that trains the
# classifier's input side differently; head-only training on both models.
@pytest.mark.parametrize(
    "kind,finetune,pooling,mode,microbatch_size,use_mask,grouping",
    [
        ("bert", "full", "mean", "elliptical", 4, True, "layer"),
        ("bert", "lora", "mean", "global", None, True, None),
        ("bert", "head", "mean", "elliptical", 2, True, "array"),
        ("bert", "head", "cls", "global", None, False, None),
        ("roberta", "head", "cls", "elliptical", 4, True, "array"),
    ],
)
def test_ghost_equals_vmap_for_pooling_and_head(kind, finetune, pooling, mode, microbatch_size, use_mask, grouping):
    compare(kind, finetune, mode, microbatch_size=microbatch_size, use_mask=use_mask, grouping=grouping,
            pooling=pooling)


@pytest.mark.parametrize(
    "kind,finetune,mode,microbatch_size,use_mask,grouping",
    [
        ("bert", "full", "elliptical", 4, True, "array"),
        ("roberta", "lora", "global", None, False, "layer"),
    ],
)
def test_ghost_equals_vmap_with_automatic_clipping(kind, finetune, mode, microbatch_size, use_mask, grouping):
    compare(kind, finetune, mode, microbatch_size=microbatch_size, use_mask=use_mask, grouping=grouping,
            clip_fn="automatic")


def test_both_kernel_norm_methods():
    """Gram matrices and materialised per-example kernel gradients give the same sums."""
    model, params = tiny_model("bert", "bias")
    trainable, frozen = M.partition(params, "full")
    batch = tiny_batch("bert", rows=4, length=8)
    loss_fn = step_functions.make_example_loss(model, frozen, False)
    kwargs = dict(l2_norm_clip=0.1, clipping="global")

    def run(trainable, frozen, batch):
        return (
            clipping.clipped_grad_sum(loss_fn, trainable, batch, None, **kwargs),
            [ghost.clipped_grad_sum(model, trainable, frozen, batch, None, kernel_norm=k, **kwargs)
             for k in ("gram", "direct")],
        )

    ref, (gram, direct) = run_fast(run, trainable, frozen, batch)
    assert_clipped_sums_equal(ref, gram, "gram")
    assert_clipped_sums_equal(ref, direct, "direct")


def test_unknown_trainable_leaf_is_an_error():
    model, params = tiny_model("bert", "bias")
    trainable, frozen = M.partition(params, "bias")
    trainable = dict(trainable, extra={"weight": jnp.zeros(3)})
    with pytest.raises(ValueError, match="extra/weight"):
        jax.eval_shape(
            lambda t: ghost.clipped_grad_sum(model, t, frozen, tiny_batch("bert", 2, 4), None,
                                             l2_norm_clip=1.0, clipping="global"),
            trainable,
        )


def test_dropout_is_refused():
    model, params = tiny_model("bert", "bias")
    trainable, frozen = M.partition(params, "bias")
    with pytest.raises(ValueError, match="dropout"):
        ghost.clipped_grad_sum(model, trainable, frozen, tiny_batch("bert", 2, 4), None,
                               l2_norm_clip=1.0, clipping="global", dropout=True)


def test_hooks_are_inert():
    """Without the collections the model's outputs and parameters are what they were."""
    model, params = tiny_model("roberta", "lora")
    batch = tiny_batch("roberta", 2, 6)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    plain = model.apply({"params": params}, *args)
    recorded, state = model.apply({"params": params}, *args, mutable=["intermediates"])
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(recorded))
    assert "perturbations" not in state and "intermediates" in state
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args))
    assert jax.tree_util.tree_structure(shapes["params"]) == jax.tree_util.tree_structure(params)


def test_training_step_with_ghost_engine_equals_vmap_engine():
    """`train.clipping_engine` picks the engine inside the training loop's step."""
    from configs import base

    model, params = tiny_model("roberta", "lora")
    trainable, frozen = M.partition(params, "lora")
    batch = tiny_batch("roberta", rows=4, length=8)
    mask = jnp.asarray([1.0, 0.0, 1.0, 1.0])
    out = {}
    for engine in _validate.CLIPPING_ENGINES:
        config = base.get_config()
        config.privacy.importance = "private_profile"
        config.privacy.l2_norm_clip = 0.05
        config.train.microbatch_size = 2
        config.train.clipping_engine = engine
        mechanism = train.mechanism_from_config(config, noise_multiplier=1.0, expected_batch_size=4.0)
        fns = train.make_step_functions(model, mechanism, train.make_optimizer(config.train, 10), config)
        scales = jax.tree_util.tree_map(lambda x: jnp.float32(0.5 + np.size(x) % 3), trainable)
        args = (trainable, frozen, scales, batch, mask)
        out[engine] = fns.accumulate.lower(*args).compile(compiler_options=FAST_COMPILE)(*args)
    assert out["ghost"].profile is not None
    assert_clipped_sums_equal(out["vmap"], out["ghost"], "train step")


def test_config_validation_of_the_engine():
    from configs import base

    config = base.get_config()
    assert config.train.clipping_engine == "ghost"
    train.validate_config(config)
    config.train.clipping_engine = "vmap"
    config.model.dropout = True
    train.validate_config(config)  # dropout works with per-example gradients
    config.train.clipping_engine = "ghost"
    with pytest.raises(ValueError, match="clipping_engine"):
        train.validate_config(config)
    config.model.dropout = False
    config.train.clipping_engine = "fast"
    with pytest.raises(ValueError, match="clipping_engine"):
        train.validate_config(config)


def test_non_finite_examples_contribute_exactly_nothing():
    """Tiny BERT, full fine-tuning: two examples hold a token whose embedding row
    is NaN (one) or inf (the other), so their losses and every record and
    cotangent of theirs are non-finite. Both engines drop them: finite sums
    (and profiles), bit for bit the sums with those rows masked out, and those of
    the clean model (the bad rows used by no one else) with them masked out."""
    model, clean = tiny_model("bert", "full")
    nan_row, inf_row = 2, 5
    table = clean["embeddings"]["word_embeddings"]["embedding"]
    # Ids 1 and 2 occur in no tiny_batch row (real ids are >= 3, padding is 0).
    table = table.at[1].set(jnp.nan).at[2].set(jnp.inf)
    bad = {**clean, "embeddings": {**clean["embeddings"], "word_embeddings": {"embedding": table}}}
    batch = tiny_batch("bert")
    batch["input_ids"] = batch["input_ids"].copy()
    batch["input_ids"][nan_row, 1] = 1
    batch["input_ids"][inf_row, 2] = 2
    trainable, frozen = M.partition(bad, "full")
    clean_trainable, _ = M.partition(clean, "full")
    groups = allocation.make_groups(trainable, "array")
    rng = np.random.default_rng(4)
    scales = jax.tree_util.tree_map(lambda _: jnp.float32(rng.uniform(0.5, 2.0)), trainable)
    masks = [None, np.array([1, 1, 0, 1, 1, 1, 1, 0], np.float32), np.array([1, 1, 1, 0, 1, 0, 1, 1], np.float32)]
    kwargs = dict(l2_norm_clip=0.5, clipping="elliptical", groups=groups)

    def dropped(mask):
        kept = np.ones(8, np.float32) if mask is None else mask.copy()
        kept[[nan_row, inf_row]] = 0.0
        return jnp.asarray(kept)

    def run(trainable, clean_trainable, frozen, batch, scales):
        def both(params, mask):
            loss_fn = step_functions.make_example_loss(model, frozen, False)
            return (
                ghost.clipped_grad_sum(model, params, frozen, batch, scales, mask=mask, microbatch_size=4, **kwargs),
                clipping.clipped_grad_sum(loss_fn, params, batch, scales, mask=mask, **kwargs),
            )

        return [(both(trainable, mask), both(trainable, dropped(mask)), both(clean_trainable, dropped(mask)))
                for mask in masks]

    for got, masked, clean_masked in run_fast(run, trainable, clean_trainable, frozen, batch, scales):
        for engine in range(2):
            for want in (masked[engine], clean_masked[engine]):
                for x, y in zip(jax.tree_util.tree_leaves(got[engine]), jax.tree_util.tree_leaves(want), strict=True):
                    assert np.all(np.isfinite(np.asarray(x)))
                    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert_clipped_sums_equal(got[1], got[0], "non-finite rows")


def dot_precisions(lowered_text: str) -> list[str]:
    return [line.split("precision = ")[1].split("]")[0] + "]" if "precision = " in line else "none"
            for line in lowered_text.splitlines() if "stablehlo.dot_general" in line]


@pytest.mark.parametrize("kernel_norm", ["gram", "direct"])
def test_contractions_run_at_full_float32(kernel_norm):
    """Every dot of the engine that is not the model's own forward or backward pass
    runs at HIGHEST precision (the CPU ignores the flag, so the program text is
    checked): the model's passes are lowered alone and their non-HIGHEST dots
    must be all the engine's program has. Full fine-tuning with LoRA on every
    dense module meets every rule (dense, LoRA, LayerNorm, both embedding cases)."""
    model, params = tiny_model("bert", "full")
    trainable, frozen = M.partition(params, "full")
    batch = tiny_batch("bert", rows=4, length=8)
    groups = allocation.make_groups(trainable, "array")
    leaf_paths = allocation.leaf_paths(trainable)

    def engine(trainable, frozen, batch):
        scales = jax.tree_util.tree_map(lambda _: jnp.float32(1.5), trainable)
        return ghost.clipped_grad_sum(model, trainable, frozen, batch, scales, l2_norm_clip=1.0,
                                      clipping="elliptical", groups=groups, kernel_norm=kernel_norm)

    def passes_alone(trainable, frozen, batch):
        return ghost._records_and_cotangents(model, M.combine(trainable, frozen), leaf_paths, batch)[1:]

    def precisions(fn):
        return dot_precisions(jax.jit(fn).lower(trainable, frozen, batch).as_text())

    full, model_only = precisions(engine), precisions(passes_alone)
    not_highest = [p for p in full if p != "[HIGHEST, HIGHEST]"]
    assert len(not_highest) == len([p for p in model_only if p != "[HIGHEST, HIGHEST]"]) > 0
    assert len(full) - len(model_only) >= 2 * len(leaf_paths) // 3  # the engine's own dots are there


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_each_whitened_contribution_is_at_most_c(kind, finetune):
    """One example at a time (all others masked), elliptical clipping with uneven
    scales: every whitened contribution's norm is <= C (1 + 1e-6), with C below
    every example's norm, so that each contribution sits at the bound; with
    clip_fn="automatic" it is C n / (n + r) for the example's whitened norm n.
    (The CPU computes in float32 whatever the precision flag: on a GPU this is
    what TF32 contractions would break.)"""
    model, params = tiny_model(kind, finetune)
    trainable, frozen = M.partition(params, finetune)
    batch = tiny_batch(kind)
    rng = np.random.default_rng(5)
    scales = jax.tree_util.tree_map(lambda _: jnp.float32(rng.uniform(0.3, 3.0)), trainable)
    one_at_a_time = jnp.eye(8, dtype=jnp.float32)

    r = 0.01

    def contributions(trainable, frozen, batch, scales, clip):
        def one(mask, clip_fn):
            return ghost.clipped_grad_sum(model, trainable, frozen, batch, scales, mask=mask, l2_norm_clip=clip,
                                          clipping="elliptical", clip_fn=clip_fn, automatic_r=r).grads
        return {fn: jax.vmap(lambda m, fn=fn: one(m, fn))(one_at_a_time) for fn in clipping.CLIP_FNS}

    compiled = jax.jit(contributions).lower(trainable, frozen, batch, scales, 1.0).compile(
        compiler_options=FAST_COMPILE)

    def norms(clip):
        out = compiled(trainable, frozen, batch, scales, clip)
        return {fn: np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)).reshape(8, -1), axis=1)
                                for x in jax.tree_util.tree_leaves(tree)))
                for fn, tree in out.items()}

    whitened = norms(1e9)["clip"]  # factor 1: the whitened gradients themselves
    assert np.all(np.isfinite(whitened)) and np.all(whitened > 0)
    clip = 0.5 * float(np.min(whitened))
    got = norms(clip)
    assert np.all(got["clip"] <= clip * (1 + 1e-6)), got["clip"] / clip - 1
    assert np.all(got["clip"] >= clip * (1 - 1e-5))
    assert np.all(got["automatic"] <= clip * (1 + 1e-6)), got["automatic"] / clip - 1
    np.testing.assert_allclose(got["automatic"], clip * whitened / (whitened + r), rtol=1e-5)


def test_training_step_passes_the_clip_fn(monkeypatch):
    """config.privacy.clip_fn and automatic_r reach the clipping call of either engine."""
    from configs import base

    model, params = tiny_model("bert", "bias")
    trainable, frozen = M.partition(params, "bias")
    batch = tiny_batch("bert", rows=4, length=8)
    seen = []

    def fake_clipped_sum(*args, **kwargs):
        seen.append((kwargs["clip_fn"], kwargs["automatic_r"]))
        return clipping.GradientSum(jax.tree_util.tree_map(jnp.zeros_like, trainable))

    monkeypatch.setattr(ghost, "clipped_grad_sum", fake_clipped_sum)
    monkeypatch.setattr(step_functions, "clipped_grad_sum", fake_clipped_sum)
    for engine in _validate.CLIPPING_ENGINES:
        config = base.get_config()
        config.privacy.clip_fn = "automatic"
        config.privacy.automatic_r = 0.125
        config.train.clipping_engine = engine
        train.validate_config(config)
        mechanism = train.mechanism_from_config(config, noise_multiplier=1.0, expected_batch_size=4.0)
        assert (mechanism.clip_fn, mechanism.automatic_r) == ("automatic", 0.125)
        fns = train.make_step_functions(model, mechanism, train.make_optimizer(config.train, 10), config)
        jax.eval_shape(fns.accumulate, trainable, frozen, trainable, batch, jnp.ones(4))
    assert seen == [("automatic", 0.125)] * 2


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("clip_fn", "normalise", r"config.privacy.clip_fn='normalise' is invalid: must be one of \('clip', 'autom"),
        ("automatic_r", 0.0, r"config.privacy.automatic_r=0.0 is invalid: must be in \(0, inf\)"),
        ("automatic_r", -1.0, r"config.privacy.automatic_r=-1.0 is invalid"),
    ],
)
@pytest.mark.parametrize("method", ["dp_sgd", "anadp"])
def test_config_validation_of_the_clip_fn(field, value, message, method):
    from configs import base

    config = base.get_config()
    assert (config.privacy.clip_fn, config.privacy.automatic_r) == ("clip", 0.01)
    config.privacy.method = method
    config.privacy[field] = value
    with pytest.raises(ValueError, match=message):
        train.validate_config(config)
