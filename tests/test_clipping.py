"""Clipping and privatize against a plain Python loop over examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anadp
from anadp import allocation, clipping

C = 1.0


def random_grads(key, batch=7):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "dense": {"kernel": 2.0 * jax.random.normal(k1, (batch, 4, 3)), "bias": jax.random.normal(k2, (batch, 3))},
        "head": 0.3 * jax.random.normal(k3, (batch, 5)),
    }


SCALES = {"dense": {"kernel": 0.5, "bias": 2.0}, "head": 1.3}


def loop_reference(grads, scales, mode, mask=None, clip_fn="clip", r=clipping.DEFAULT_AUTOMATIC_R):
    """Clip each example in NumPy, one at a time, and sum (then divide by qN=1)."""

    def factor(norm):
        return C / (norm + r) if clip_fn == "automatic" else min(1.0, C / norm)

    leaves, treedef = jax.tree_util.tree_flatten(grads)
    scale_leaves = treedef.flatten_up_to(scales)
    batch = leaves[0].shape[0]
    total = [np.zeros(x.shape[1:]) for x in leaves]
    for i in range(batch):
        if mask is not None and not mask[i]:
            continue
        g = [np.asarray(x[i], np.float64) for x in leaves]
        if mode == "elliptical":
            h = [gi / s for gi, s in zip(g, scale_leaves)]
            norm = np.sqrt(sum(np.sum(x**2) for x in h))
            # G = s * H: clipped whitened gradient mapped back to parameter space
            contrib = [factor(norm) * hi * s for hi, s in zip(h, scale_leaves)]
        else:
            norm = np.sqrt(sum(np.sum(x**2) for x in g))
            contrib = [factor(norm) * gi for gi in g]
        total = [t + c for t, c in zip(total, contrib)]
    return treedef.unflatten(total)


def assert_trees_close(a, b, atol=1e-5):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=1e-5)


@pytest.mark.parametrize("mode", ["elliptical", "global"])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("clip_fn", clipping.CLIP_FNS)
def test_privatize_without_noise_equals_loop(mode, use_mask, clip_fn):
    grads = random_grads(jax.random.PRNGKey(0))
    mask = np.array([1, 1, 0, 1, 0, 1, 1], bool) if use_mask else None
    out = anadp.privatize(
        grads, SCALES, jax.random.PRNGKey(1), l2_norm_clip=C, noise_multiplier=0.0,
        expected_batch_size=1.0, clipping=mode, mask=None if mask is None else jnp.asarray(mask),
        clip_fn=clip_fn, automatic_r=0.3,
    )
    assert_trees_close(out, loop_reference(grads, SCALES, mode, mask, clip_fn, r=0.3))


@pytest.mark.parametrize("mode", ["elliptical", "global"])
def test_masked_rows_change_nothing(mode):
    grads = random_grads(jax.random.PRNGKey(2))
    mask = jnp.array([1, 0, 1, 0, 1, 1, 0])
    garbage = jax.tree_util.tree_map(
        lambda g: g.at[jnp.array([1, 3, 6])].set(1e6), grads
    )
    kwargs = dict(l2_norm_clip=C, noise_multiplier=1.0, expected_batch_size=3.0, clipping=mode, mask=mask)
    a = anadp.privatize(grads, SCALES, jax.random.PRNGKey(3), **kwargs)
    b = anadp.privatize(garbage, SCALES, jax.random.PRNGKey(3), **kwargs)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def quadratic_loss(params, example):
    """A loss whose per-example gradient is easy to state: grad = example['g'] * params."""
    return 0.5 * sum(
        jnp.sum(e * p**2) for e, p in zip(jax.tree_util.tree_leaves(example["g"]), jax.tree_util.tree_leaves(params))
    )


@pytest.mark.parametrize("mode", ["elliptical", "global"])
@pytest.mark.parametrize("microbatch_size", [None, 1, 2, 4])
def test_memory_path_equals_loop(mode, microbatch_size):
    params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.array([0.5, -2.0])}
    batch_size = 8
    coeffs = {
        "w": jax.random.normal(jax.random.PRNGKey(4), (batch_size, 2, 3)),
        "b": jax.random.normal(jax.random.PRNGKey(5), (batch_size, 2)),
    }
    mask = jnp.array([1, 1, 1, 0, 1, 0, 1, 1])
    scales = {"w": 0.7, "b": 1.9}
    clipped = anadp.clipped_grad_sum(
        quadratic_loss, params, {"g": coeffs}, scales, l2_norm_clip=C, clipping=mode,
        mask=mask, microbatch_size=microbatch_size,
    )
    grads = jax.tree_util.tree_map(lambda c, p: c * p, coeffs, params)
    # The clipped sum lives in the space noise is added in: whitened for elliptical.
    released = anadp.noise.add_noise(
        clipped.grads, scales, jax.random.PRNGKey(0), l2_norm_clip=C, noise_multiplier=0.0,
        expected_batch_size=1.0, clipping=mode,
    )
    assert_trees_close(released, loop_reference(grads, scales, mode, np.asarray(mask, bool)))


def test_microbatch_must_divide_batch():
    params = {"w": jnp.ones(2)}
    batch = {"g": {"w": jnp.ones((6, 2))}}
    with pytest.raises(ValueError, match="not a multiple of microbatch_size=4"):
        anadp.clipped_grad_sum(
            quadratic_loss, params, batch, None, l2_norm_clip=C, clipping="global", microbatch_size=4
        )


@pytest.mark.parametrize("mode", ["elliptical", "global"])
def test_each_contribution_bounded(mode):
    """One example's whitened (elliptical) or raw (global) contribution has norm <= C."""
    grads = jax.tree_util.tree_map(lambda g: 100.0 * g[:1], random_grads(jax.random.PRNGKey(6)))
    out = anadp.clipped_sum(grads, SCALES, l2_norm_clip=C, clipping=mode)
    norm = np.sqrt(sum(float(jnp.sum(x**2)) for x in jax.tree_util.tree_leaves(out.grads)))
    assert norm == pytest.approx(C, rel=1e-5)


def test_profile_is_unit_norm_share_per_group():
    grads = random_grads(jax.random.PRNGKey(7), batch=3)
    groups = allocation.make_groups(SCALES)
    out = anadp.clipped_sum(grads, None, l2_norm_clip=C, clipping="global", groups=groups, mask=jnp.array([1, 1, 0]))
    expected = np.zeros(groups.num_groups)
    leaves = jax.tree_util.tree_leaves(grads)
    for i in range(2):
        per_leaf = np.array([np.linalg.norm(np.asarray(x[i])) for x in leaves])
        expected += per_leaf / np.linalg.norm(per_leaf)  # one group per leaf here
    np.testing.assert_allclose(out.profile, expected, rtol=1e-5)


def test_zero_gradient_has_zero_profile_and_no_nan():
    grads = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((2, 1))}
    groups = allocation.make_groups({"a": jnp.zeros(3), "b": jnp.zeros(1)})
    out = anadp.clipped_sum(grads, None, l2_norm_clip=C, clipping="elliptical", groups=groups)
    np.testing.assert_array_equal(out.profile, 0.0)
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(out.grads))


def test_unknown_clipping_mode():
    with pytest.raises(ValueError, match="clipping='ellipse' is not one of"):
        clipping.check_clipping("ellipse")


NAN_ROW, INF_ROW = 2, 5


def poisoned(grads):
    """`grads` with a NaN in one entry of example NAN_ROW and an inf in one of example INF_ROW."""
    return {
        "dense": {"kernel": grads["dense"]["kernel"].at[NAN_ROW, 1, 2].set(jnp.nan), "bias": grads["dense"]["bias"]},
        "head": grads["head"].at[INF_ROW, 0].set(jnp.inf),
    }


# None: every row real, the bad ones included; "bad_real": padding elsewhere;
# "bad_padding": the bad rows are padding themselves (a mask 0 must not let a NaN through).
BAD_ROW_MASKS = {
    None: None,
    "bad_real": [1, 1, 1, 0, 1, 1, 1],
    "bad_padding": [1, 0, 0, 1, 1, 0, 1],
}


def without_bad_rows(mask, batch=7):
    kept = np.ones(batch, np.float32) if mask is None else np.array(mask, np.float32)
    kept[[NAN_ROW, INF_ROW]] = 0.0
    return jnp.asarray(kept)


def assert_trees_equal_and_finite(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.all(np.isfinite(np.asarray(x)))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("mode", ["elliptical", "global"])
@pytest.mark.parametrize("mask_kind", list(BAD_ROW_MASKS))
@pytest.mark.parametrize("clip_fn", clipping.CLIP_FNS)
def test_non_finite_rows_contribute_exactly_nothing(mode, mask_kind, clip_fn):
    """A NaN or inf example is dropped: the sum, the profile and the release are
    finite and bit for bit those of the clean batch with that example masked out."""
    grads = random_grads(jax.random.PRNGKey(8))
    bad = poisoned(grads)
    mask = BAD_ROW_MASKS[mask_kind]
    mask = None if mask is None else jnp.asarray(mask, jnp.float32)
    dropped = without_bad_rows(mask)
    groups = allocation.make_groups(SCALES)
    kwargs = dict(l2_norm_clip=C, clipping=mode, groups=groups, clip_fn=clip_fn)
    got = anadp.clipped_sum(bad, SCALES, mask=mask, **kwargs)
    want = anadp.clipped_sum(grads, SCALES, mask=dropped, **kwargs)
    assert_trees_equal_and_finite(got, want)
    assert float(jnp.sum(want.profile)) > 0

    release = dict(l2_norm_clip=C, noise_multiplier=1.0, expected_batch_size=4.0, clipping=mode, clip_fn=clip_fn)
    key = jax.random.PRNGKey(9)
    assert_trees_equal_and_finite(
        anadp.privatize(bad, SCALES, key, mask=mask, **release),
        anadp.privatize(grads, SCALES, key, mask=dropped, **release),
    )

    # The mechanism (released gradient and next state, profile included) likewise.
    params = jax.tree_util.tree_map(lambda g: jnp.zeros(g.shape[1:]), grads)
    mech = anadp.Mechanism(C, 1.0, 4.0, seed=1, adaptive=True, clipping=mode, gamma=1.0, rho=3.0,
                           importance="private_profile", clip_fn=clip_fn)
    state = mech.init(params)._replace(scales=SCALES)
    tx = anadp.dp_aggregate(mech)
    assert_trees_equal_and_finite(
        tx.update(bad, state, params, mask=mask), tx.update(grads, state, params, mask=dropped)
    )


@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_memory_path_drops_non_finite_rows(microbatch_size):
    params = {"w": jnp.arange(1.0, 7.0).reshape(2, 3), "b": jnp.array([0.5, -2.0])}
    coeffs = {
        "w": jax.random.normal(jax.random.PRNGKey(10), (8, 2, 3)),
        "b": jax.random.normal(jax.random.PRNGKey(11), (8, 2)),
    }
    bad = {"w": coeffs["w"].at[1, 0, 0].set(jnp.nan), "b": coeffs["b"].at[6, 1].set(-jnp.inf)}
    mask = jnp.array([1, 1, 1, 0, 1, 0, 1, 1], jnp.float32)
    dropped = mask.at[jnp.array([1, 6])].set(0.0)
    groups = allocation.make_groups(params)
    kwargs = dict(l2_norm_clip=C, clipping="elliptical", groups=groups, microbatch_size=microbatch_size)
    scales = {"w": 0.7, "b": 1.9}
    assert_trees_equal_and_finite(
        anadp.clipped_grad_sum(quadratic_loss, params, {"g": bad}, scales, mask=mask, **kwargs),
        anadp.clipped_grad_sum(quadratic_loss, params, {"g": coeffs}, scales, mask=dropped, **kwargs),
    )


def dot_precisions(lowered_text: str) -> list[str]:
    """The precision of every dot_general in a lowered (StableHLO) program."""
    return [line.split("precision = ")[1].split("]")[0] + "]" if "precision = " in line else "none"
            for line in lowered_text.splitlines() if "stablehlo.dot_general" in line]


@pytest.mark.parametrize("mode", ["elliptical", "global"])
def test_contractions_run_at_full_float32(mode):
    """On GPUs a default-precision float32 matmul is TF32; the CPU computes in float32
    whatever the flag, so the program text is what a CPU test can check."""
    grads = random_grads(jax.random.PRNGKey(12))
    groups = allocation.make_groups(SCALES)
    text = jax.jit(
        lambda g: anadp.clipped_sum(g, SCALES, l2_norm_clip=C, clipping=mode, groups=groups, mask=jnp.ones(7))
    ).lower(grads).as_text()
    precisions = dot_precisions(text)
    assert len(precisions) >= len(jax.tree_util.tree_leaves(grads))
    assert set(precisions) == {"[HIGHEST, HIGHEST]"}


@pytest.mark.parametrize("mode", ["elliptical", "global"])
def test_automatic_contributions_are_bounded_and_rescaled(mode):
    """clip_fn="automatic": one example at a time, the contribution (whitened for
    elliptical) is C n / (n + r) <= C for its norm n, large or small; a zero
    gradient contributes exactly 0 (factor C / r, finite)."""
    r = 0.05
    grads = random_grads(jax.random.PRNGKey(13), batch=6)
    sizes = jnp.array([1e4, 30.0, 1.0, 0.1, 1e-3, 0.0])  # from far above C to zero
    grads = jax.tree_util.tree_map(lambda g: g * sizes.reshape((-1,) + (1,) * (g.ndim - 1)), grads)
    scale_leaves = jax.tree_util.tree_leaves(SCALES)
    sq = [np.sum(np.square(np.asarray(x, np.float64)).reshape(6, -1), axis=1) for x in jax.tree_util.tree_leaves(grads)]
    whiten = mode == "elliptical"
    n = np.sqrt(sum(q / (s**2 if whiten else 1.0) for q, s in zip(sq, scale_leaves)))
    for i in range(6):
        out = anadp.clipped_sum(grads, SCALES, l2_norm_clip=C, clipping=mode, mask=jnp.arange(6) == i,
                                clip_fn="automatic", automatic_r=r)
        leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(out.grads)]
        assert all(np.all(np.isfinite(x)) for x in leaves)
        norm = np.sqrt(sum(np.sum(x**2) for x in leaves))
        assert norm <= C * (1 + 1e-6)
        assert norm == pytest.approx(C * n[i] / (n[i] + r), rel=1e-5, abs=0.0)
    assert norm == 0.0  # the zero gradient


def test_bad_clip_fn_or_automatic_r_is_refused():
    grads = random_grads(jax.random.PRNGKey(14), batch=2)
    with pytest.raises(ValueError, match=r"clip_fn='normalise' is not one of \('clip', 'automatic'\)"):
        anadp.clipped_sum(grads, None, l2_norm_clip=C, clipping="global", clip_fn="normalise")
    for r in (0.0, -0.01, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"automatic_r={r} must be in \(0, inf\)"):
            anadp.clipped_sum(grads, None, l2_norm_clip=C, clipping="global", clip_fn="automatic", automatic_r=r)
