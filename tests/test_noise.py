"""The mechanism's privacy properties: noise scale, sensitivity, DP-SGD equivalence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import anadp
from anadp import accounting, allocation, calibration, clipping, importance
from anadp.noise import Mechanism, group_values

C, SIGMA, QN = 1.5, 0.8, 64.0


def params_tree():
    return {
        "layer_0": {"query": {"kernel": jnp.full((6, 5), 0.3), "bias": jnp.full((5,), -0.1)}},
        "classifier": {"kernel": jnp.full((5, 2), 1.0)},
    }


def random_per_example(key, params, batch=9):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, (batch,) + x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("clip_fn", clipping.CLIP_FNS)
def test_gamma_zero_is_bit_identical_to_dp_sgd(clip_fn):
    params = params_tree()
    dp_sgd = Mechanism(C, SIGMA, QN, seed=3, clipping="global", clip_fn=clip_fn)
    anadp_gamma0 = Mechanism(C, SIGMA, QN, seed=3, adaptive=True, gamma=0.0, rho=4.0, importance="elementwise",
                             clip_fn=clip_fn)
    dp = optax.chain(anadp.dp_aggregate(dp_sgd), optax.adam(1e-2))
    ad = optax.chain(anadp.dp_aggregate(anadp_gamma0), optax.adam(1e-2))
    p_dp, p_ad = params, params
    s_dp, s_ad = dp.init(params), ad.init(params)
    step_dp, step_ad = jax.jit(dp.update), jax.jit(ad.update)
    for t in range(4):
        grads = random_per_example(jax.random.PRNGKey(t), params)
        mask = jnp.arange(9) < 7
        u_dp, s_dp = step_dp(grads, s_dp, p_dp, mask=mask)
        u_ad, s_ad = step_ad(grads, s_ad, p_ad, mask=mask)
        p_dp, p_ad = optax.apply_updates(p_dp, u_dp), optax.apply_updates(p_ad, u_ad)
        for x, y in zip(jax.tree_util.tree_leaves(p_dp), jax.tree_util.tree_leaves(p_ad)):
            np.testing.assert_array_equal(x, y)
    for s in jax.tree_util.tree_leaves(s_ad[0].scales):
        assert float(s) == 1.0


@pytest.mark.parametrize("mode", ["elliptical", "global"])
def test_noise_std_per_group(mode):
    scales = {"big": jnp.asarray(0.5), "small": jnp.asarray(3.0)}
    zeros = {"big": jnp.zeros((4, 20000)), "small": jnp.zeros((4, 20000))}
    out = anadp.privatize(
        zeros, scales, jax.random.PRNGKey(0), l2_norm_clip=C, noise_multiplier=SIGMA,
        expected_batch_size=QN, clipping=mode,
    )
    for name in scales:
        expected = SIGMA * C * float(scales[name]) / QN
        assert float(jnp.std(out[name])) == pytest.approx(expected, rel=0.03)
        assert abs(float(jnp.mean(out[name]))) < 0.03 * expected


def whitened_difference(mode, scales, adversary):
    """|| (G(D + x) - G(D)) / noise_std || for one added example x, same key."""
    params = params_tree()
    grads = random_per_example(jax.random.PRNGKey(11), params, batch=5)
    with_adv = jax.tree_util.tree_map(lambda g, a: jnp.concatenate([g, a[None]]), grads, adversary)
    mask_without = jnp.array([1, 1, 1, 1, 1, 0])
    kwargs = dict(l2_norm_clip=C, noise_multiplier=SIGMA, expected_batch_size=QN, clipping=mode)
    key = jax.random.PRNGKey(5)
    a = anadp.privatize(with_adv, scales, key, **kwargs)
    b = anadp.privatize(with_adv, scales, key, mask=mask_without, **kwargs)
    total = 0.0
    for x, y, s in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), jax.tree_util.tree_leaves(scales)):
        std = SIGMA * C * float(s) / QN
        total += float(jnp.sum(((x - y) / std) ** 2))
    return np.sqrt(total)


def skewed_scales():
    params = params_tree()
    groups = allocation.make_groups(params)
    s = allocation.noise_scales(jnp.array([1.0, 8.0, 0.2]), groups.sizes, gamma=1.0, rho=4.0)
    return allocation.broadcast_to_leaves(s, groups, params)


@pytest.mark.parametrize("mode", ["elliptical", "global"])
def test_neighbouring_batches_sensitivity(mode):
    scales = skewed_scales()
    leaves = jax.tree_util.tree_leaves(scales)
    least = int(np.argmin([float(s) for s in leaves]))
    # The adversary's gradient sits entirely in the least-noised group, far beyond C.
    adv_leaves = [
        jnp.full(x.shape, 100.0) if i == least else jnp.zeros(x.shape)
        for i, x in enumerate(jax.tree_util.tree_leaves(params_tree()))
    ]
    adversary = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(scales), adv_leaves)
    z_eff = accounting.effective_noise_multiplier(SIGMA, [float(s) for s in leaves], mode)
    diff = whitened_difference(mode, scales, adversary)
    assert diff <= 1.0 / z_eff * (1 + 1e-5)
    if mode == "global":
        assert z_eff < SIGMA
        # The adversary attains the bound: the leak is real, not an artefact of the bound.
        assert diff == pytest.approx(1.0 / z_eff, rel=1e-4)
    else:
        assert z_eff == SIGMA


def test_transform_importance_is_fed_only_by_its_releases():
    """Re-running the estimator on the released gradients reproduces the state.

    If raw or per-example gradients leaked into the scorer, the transform's
    importance state would differ from this replay.
    """
    params = params_tree()
    for name in ["elementwise", "group_taylor", "signal", "private_profile"]:
        mech = Mechanism(C, SIGMA, QN, seed=1, adaptive=True, clipping="elliptical", gamma=1.0,
                         rho=3.0, importance=name)
        groups = mech.groups(params)
        est = mech.estimator
        state = mech.init(params)
        replay = est.init(params, groups)
        for t in range(3):
            grads = random_per_example(jax.random.PRNGKey(20 + t), params)
            scales_before = state.scales
            released, state = jax.jit(anadp.dp_aggregate(mech).update)(grads, state, params)
            noise_std = SIGMA * C * group_values(scales_before, groups) / QN
            profile = None
            if name == "private_profile":
                # the profile is released too; recover it from the same key schedule
                profile = _released_profile(mech, grads, params, t)
            replay = est.update(replay, importance.Release(released, noise_std, profile), params, groups)
        for x, y in zip(jax.tree_util.tree_leaves(state.importance), jax.tree_util.tree_leaves(replay)):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-8)


def _released_profile(mech, grads, params, step):
    key = jax.random.PRNGKey(mech.seed)
    for _ in range(step + 1):
        key, step_key = jax.random.split(key)
    _, profile_key = jax.random.split(step_key)
    clipped = anadp.clipped_sum(grads, None, l2_norm_clip=C, clipping="global", groups=mech.groups(params))
    noise = jax.random.normal(profile_key, clipped.profile.shape)
    return (clipped.profile + mech.profile_noise_multiplier * noise) / QN


def test_warmup_keeps_uniform_scales():
    params = params_tree()
    mech = Mechanism(C, SIGMA, QN, adaptive=True, clipping="elliptical", gamma=1.0, rho=4.0, warmup_steps=2)
    tx = anadp.dp_aggregate(mech)
    state = tx.init(params)
    for t in range(3):
        _, state = tx.update(random_per_example(jax.random.PRNGKey(t), params), state, params)
        scales = [float(s) for s in jax.tree_util.tree_leaves(state.scales)]
        if t + 1 < 2:
            assert scales == [1.0] * len(scales)
    assert max(scales) > 1.0 > min(scales)


def test_noise_key_never_repeats():
    params = params_tree()
    tx = anadp.dp_aggregate(Mechanism(C, SIGMA, QN))
    state = tx.init(params)
    seen = set()
    zero = jax.tree_util.tree_map(lambda p: jnp.zeros((1,) + p.shape), params)
    for _ in range(5):
        released, state = tx.update(zero, state, params)
        fingerprint = float(released["classifier"]["kernel"][0, 0])
        assert fingerprint not in seen
        seen.add(fingerprint)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(l2_norm_clip=0.0), "l2_norm_clip=0.0 must be > 0"),
        (dict(noise_multiplier=-1.0), "noise_multiplier=-1.0 must be >= 0"),
        (dict(expected_batch_size=0.0), "expected_batch_size=0.0 must be > 0"),
        (dict(rho=0.5), "rho=0.5 must be >= 1"),
        (dict(importance="magic"), "importance='magic' is not one of"),
        (dict(grouping="row"), "grouping='row' is not one of"),
        (dict(beta1=1.0), r"beta1=1.0 is outside \[0, 1\)"),
        (dict(clip_fn="normalise"), r"clip_fn='normalise' is not one of \('clip', 'automatic'\)"),
        (dict(clip_fn="automatic", automatic_r=0.0), r"automatic_r=0.0 must be in \(0, inf\)"),
        (dict(automatic_r=-0.5), r"automatic_r=-0.5 must be in \(0, inf\)"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    base = dict(l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=10.0)
    base.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Mechanism(**{**base, "adaptive": True, "clipping": "elliptical"})


def test_logistic_regression_learns_under_jit_at_epsilon_3():
    rng = np.random.default_rng(0)
    n, dim = 4000, 10
    w_true = rng.normal(size=dim)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = (x @ w_true > 0).astype(np.float32)
    batch, steps = 200, 100
    q = batch / n
    sigma = calibration.calibrate_noise_multiplier(3.0, 1e-5, q, steps)
    mechanism = Mechanism(1.0, sigma, batch, seed=0, adaptive=True, gamma=0.5, rho=2.0)
    tx = optax.chain(anadp.dp_aggregate(mechanism), optax.adam(0.05))
    params = {"w": jnp.zeros(dim), "b": jnp.zeros([])}

    def loss(p, ex):
        logit = ex["x"] @ p["w"] + p["b"]
        return optax.sigmoid_binary_cross_entropy(logit, ex["y"])

    @jax.jit
    def step(p, s, xb, yb, mask):
        grads = anadp.per_example_grads(loss, p, {"x": xb, "y": yb})
        updates, s = tx.update(grads, s, p, mask=mask)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    sampler_rng = np.random.default_rng(1)
    physical = 300
    for _ in range(steps):
        idx = np.flatnonzero(sampler_rng.random(n) < q)[:physical]
        pad = physical - len(idx)
        mask = np.r_[np.ones(len(idx)), np.zeros(pad)]
        idx = np.r_[idx, np.zeros(pad, int)]
        params, state = step(params, state, x[idx], y[idx], jnp.asarray(mask))
    acc = float(np.mean(((x @ np.asarray(params["w"]) + float(params["b"])) > 0) == y))
    assert acc > 0.85


def test_joint_release_of_gradient_and_profile_has_sensitivity_one_over_z_eff():
    """private_profile releases (G, U) from the same sample: one Gaussian mechanism with z_eff."""
    params = params_tree()
    ratio, beta1 = 2.0, 0.5
    mech = Mechanism(C, SIGMA, QN, seed=4, adaptive=True, clipping="elliptical", gamma=1.0, rho=4.0,
                     importance="private_profile", profile_noise_ratio=ratio, beta1=beta1)
    # A skewed allocation already in place, so that the whitening matters.
    state = mech.init(params)._replace(scales=skewed_scales())
    grads = random_per_example(jax.random.PRNGKey(8), params, batch=6)
    grads = jax.tree_util.tree_map(lambda g: g.at[5].multiply(50.0), grads)  # the added example is large
    tx = anadp.dp_aggregate(mech)
    with_adv, state_a = tx.update(grads, state, params, mask=jnp.ones(6))
    without, state_b = tx.update(grads, state, params, mask=jnp.array([1, 1, 1, 1, 1, 0]))
    grad_part = 0.0
    for x, y, s in zip(jax.tree_util.tree_leaves(with_adv), jax.tree_util.tree_leaves(without),
                       jax.tree_util.tree_leaves(state.scales)):
        grad_part += float(jnp.sum(((x - y) / (SIGMA * C * float(s) / QN)) ** 2))
    # The released profile is U / qN; the EMA after one step holds (1 - beta1) of it.
    profile_diff = (state_a.importance.profile - state_b.importance.profile) / (1 - beta1)
    profile_part = float(jnp.sum((profile_diff / (ratio * SIGMA / QN)) ** 2))
    z_eff = accounting.effective_noise_multiplier(SIGMA, [1.0], "elliptical", profile_noise_multiplier=ratio * SIGMA)
    assert z_eff == pytest.approx((SIGMA**-2 + (ratio * SIGMA) ** -2) ** -0.5)
    assert np.sqrt(grad_part + profile_part) <= (1.0 / z_eff) * (1 + 1e-4)
    # both parts are used: the bound is nearly attained by a large example
    assert np.sqrt(grad_part) == pytest.approx(1.0 / SIGMA, rel=1e-3)
    assert profile_part > 0.5 * (1.0 / (ratio * SIGMA)) ** 2


@pytest.mark.parametrize("adaptive", [False, True])
def test_automatic_clip_fn_reaches_the_release(adaptive):
    """Without noise, the transforms release sum_i C h_i / (||h_i|| + r) / qN
    (h = g for DP-SGD; s = 1 at the first step of ANADP): the option is used."""
    r = 0.2
    params = params_tree()
    grads = random_per_example(jax.random.PRNGKey(30), params, batch=5)
    grads = jax.tree_util.tree_map(lambda g: g * jnp.array([0.01, 0.1, 1.0, 10.0, 0.0]).reshape(
        (-1,) + (1,) * (g.ndim - 1)), grads)
    if adaptive:
        mechanism = Mechanism(C, 0.0, QN, adaptive=True, gamma=1.0, clip_fn="automatic", automatic_r=r)
    else:
        mechanism = Mechanism(C, 0.0, QN, clipping="global", clip_fn="automatic", automatic_r=r)
    tx = anadp.dp_aggregate(mechanism)
    released, _ = tx.update(grads, tx.init(params), params)
    leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(grads)]
    norms = np.sqrt(sum(np.sum(x.reshape(5, -1) ** 2, axis=1) for x in leaves))
    factors = C / (norms + r)
    for got, g in zip(jax.tree_util.tree_leaves(released), leaves, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.tensordot(factors, g, axes=1) / QN, rtol=1e-5, atol=1e-9)


def test_dp_sgd_is_the_same_computation_with_either_clipping_mode():
    """At uniform scales elliptical and global clipping coincide bit for bit, so
    DP-SGD may take the default (elliptical) like every other entry point."""
    params = params_tree()
    grads = random_per_example(jax.random.PRNGKey(40), params)
    mask = jnp.arange(9) < 7
    released = []
    for mode in ("elliptical", "global"):
        tx = anadp.dp_aggregate(Mechanism(C, SIGMA, QN, seed=2, clipping=mode))
        released.append(jax.jit(tx.update)(grads, tx.init(params), params, mask=mask)[0])
    for x, y in zip(*(jax.tree_util.tree_leaves(r) for r in released), strict=True):
        np.testing.assert_array_equal(x, y)
    assert Mechanism(C, SIGMA, QN, adaptive=True).clipping == "elliptical"


def test_the_mechanism_says_what_each_step_is_accounted_at():
    params = params_tree()
    ratio = 3.0
    elliptical = Mechanism(C, SIGMA, QN, adaptive=True, gamma=1.0, rho=4.0, importance="private_profile",
                           profile_noise_ratio=ratio)
    z_profile = accounting.effective_noise_multiplier(SIGMA, [1.0], "elliptical", ratio * SIGMA)
    s_min = elliptical.worst_case_scale(params)
    assert s_min < 1.0
    assert [elliptical.accounted_noise_multiplier(t, s_min) for t in range(3)] == [z_profile] * 3
    literal = Mechanism(C, SIGMA, QN, adaptive=True, clipping="global", gamma=1.0, rho=4.0, warmup_steps=2)
    got = [literal.accounted_noise_multiplier(t, s_min) for t in range(4)]
    assert got == [SIGMA, SIGMA, SIGMA * s_min, SIGMA * s_min]  # warmup steps are uniform by construction
    assert literal.effective_noise_multiplier([0.5, 2.0]) == SIGMA * 0.5  # a realised allocation
    assert Mechanism(C, SIGMA, QN).accounted_noise_multiplier(5, 1.0) == SIGMA
    # Calibration of a mechanism accounts for its profile release.
    calibrated = elliptical.calibrated(3.0, 1e-5, 0.05, 50, accountant="rdp")
    assert calibrated.noise_multiplier == calibration.calibrate_noise_multiplier(
        3.0, 1e-5, 0.05, 50, accountant="rdp", profile_noise_ratio=ratio)
    assert dataclasses.replace(calibrated, noise_multiplier=SIGMA) == elliptical
