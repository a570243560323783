"""Importance estimators against hand-computed references, and the allocation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anadp import allocation, importance
from anadp.importance import Release

B1, B2 = 0.8, 0.7
PARAMS = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5, 3.0, -1.0])}
GRADS = [
    {"a": jnp.array([0.1, 0.2]), "b": jnp.array([-0.3, 0.1, 0.4])},
    {"a": jnp.array([-0.2, 0.0]), "b": jnp.array([0.2, 0.2, -0.1])},
    {"a": jnp.array([0.3, -0.1]), "b": jnp.array([0.0, -0.4, 0.2])},
]
NOISE_STD = jnp.array([0.05, 0.2])
GROUPS = allocation.make_groups(PARAMS)


def run(name, profiles=None):
    est = importance.make_estimator(name, beta1=B1, beta2=B2)
    state = est.init(PARAMS, GROUPS)
    for t, g in enumerate(GRADS):
        profile = None if profiles is None else jnp.asarray(profiles[t])
        state = est.update(state, Release(g, NOISE_STD, profile), PARAMS, GROUPS)
    return np.asarray(est.group_scores(state, GROUPS))


def as_np(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def test_elementwise_matches_hand_computation():
    theta = as_np(PARAMS)
    ibar = {k: np.zeros_like(v) for k, v in theta.items()}
    ubar = {k: np.zeros_like(v) for k, v in theta.items()}
    for g in map(as_np, GRADS):
        for k in theta:
            i_t = np.abs(theta[k] * g[k])
            ibar[k] = B1 * ibar[k] + (1 - B1) * i_t
            ubar[k] = B2 * ubar[k] + (1 - B2) * np.abs(i_t - ibar[k])
    expected = [np.mean(ibar[k] * ubar[k]) for k in ["a", "b"]]
    np.testing.assert_allclose(run("elementwise"), expected, rtol=1e-5)


def test_group_taylor_matches_hand_computation():
    theta = as_np(PARAMS)
    ibar, ubar = np.zeros(2), np.zeros(2)
    for g in map(as_np, GRADS):
        t_k = np.array([abs(np.sum(theta[k] * g[k])) for k in ["a", "b"]])
        ibar = B1 * ibar + (1 - B1) * t_k
        ubar = B2 * ubar + (1 - B2) * np.abs(t_k - ibar)
    np.testing.assert_allclose(run("group_taylor"), ibar * ubar, rtol=1e-5)


def test_signal_matches_hand_computation():
    sizes = np.array([2, 3])
    m = {k: np.zeros(v.shape) for k, v in as_np(PARAMS).items()}
    nu = np.zeros(2)
    std = np.asarray(NOISE_STD, np.float64)
    for g in map(as_np, GRADS):
        m = {k: B1 * m[k] + (1 - B1) * g[k] for k in m}
        nu = B1**2 * nu + (1 - B1) ** 2 * std**2
    energy = np.array([np.sum(m[k] ** 2) for k in ["a", "b"]])
    debiased = (energy - sizes * nu) / (1 - B1**3) ** 2
    expected = np.sqrt(np.maximum(debiased, 0) / sizes)
    np.testing.assert_allclose(run("signal"), expected, rtol=1e-5)


def test_private_profile_matches_hand_computation():
    profiles = [[0.9, 0.4], [0.7, 0.6], [1.0, -0.1]]
    ema = np.zeros(2)
    for u in profiles:
        ema = B1 * ema + (1 - B1) * np.array(u)
    np.testing.assert_allclose(run("private_profile", profiles), ema / np.sqrt([2, 3]), rtol=1e-5)


def test_signal_is_unbiased_under_the_mechanisms_noise():
    """Mean over draws of the debiased energy equals the true signal energy."""
    dim, beta, std, steps = 50, 0.85, 0.3, 6
    signal = jnp.linspace(-0.2, 0.2, dim)
    params = {"w": jnp.zeros(dim)}
    groups = allocation.make_groups(params)
    est = importance.make_estimator("signal", beta1=beta)

    def one_run(key):
        state = est.init(params, groups)
        for k in jax.random.split(key, steps):
            noisy = signal + std * jax.random.normal(k, (dim,))
            state = est.update(state, Release({"w": noisy}, jnp.array([std])), params, groups)
        energy = jnp.sum(state.momentum["w"] ** 2)
        debiased = importance.debiased_signal_energy(
            energy[None], state.noise_energy, state.count, groups.sizes, beta
        )[0]
        naive = energy / (1 - beta**steps) ** 2
        return debiased, naive

    debiased, naive = jax.vmap(one_run)(jax.random.split(jax.random.PRNGKey(0), 20000))
    true_energy = float(jnp.sum(signal**2))
    assert float(jnp.mean(debiased)) == pytest.approx(true_energy, rel=0.05)
    # ...while the momentum's raw energy is dominated by the noise.
    assert float(jnp.mean(naive)) > 2 * true_energy


def test_rank_correlation_with_weight_size():
    params = {"a": jnp.full(3, 0.1), "b": jnp.full(2, -2.0), "c": jnp.full(4, 1.0)}
    groups = allocation.make_groups(params)
    assert importance.importance_weight_correlation(jnp.array([1.0, 9.0, 5.0]), params, groups) == pytest.approx(1.0)
    assert importance.importance_weight_correlation(jnp.array([9.0, 1.0, 5.0]), params, groups) == pytest.approx(-1.0)


# --- allocation --------------------------------------------------------------


def test_allocation_normalises_total_noise_energy_and_respects_bounds():
    sizes = np.array([100, 10, 1000, 5])
    scores = jnp.array([1.0, 50.0, 0.01, 3.0])
    for gamma in [-1.0, -0.5, 0.5, 1.0, 2.0]:
        for rho in [1.5, 2.0, 4.0]:
            s = np.asarray(allocation.noise_scales(scores, sizes, gamma=gamma, rho=rho), np.float64)
            assert np.sum(sizes * s**2) == pytest.approx(np.sum(sizes), rel=1e-5)
            assert s.max() / s.min() <= rho**2 * (1 + 1e-5)


def test_allocation_direction():
    sizes = np.array([10, 10, 10])
    scores = jnp.array([1.0, 2.0, 4.0])
    s = np.asarray(allocation.noise_scales(scores, sizes, gamma=1.0, rho=10.0))
    assert s[0] > s[1] > s[2]  # important groups get less noise
    s = np.asarray(allocation.noise_scales(scores, sizes, gamma=-1.0, rho=10.0))
    assert s[0] < s[1] < s[2]


def test_allocation_uniform_cases_are_exact_ones():
    sizes = np.array([7, 300, 12])
    scores = jnp.array([0.3, 5.0, 1e-9])
    for s in [
        allocation.noise_scales(scores, sizes, gamma=0.0, rho=4.0),
        allocation.noise_scales(scores, sizes, gamma=1.0, rho=1.0),
        allocation.noise_scales(jnp.zeros(3), sizes, gamma=1.0, rho=4.0),
        allocation.noise_scales(jnp.full(3, jnp.nan), sizes, gamma=1.0, rho=4.0),
    ]:
        np.testing.assert_array_equal(s, 1.0)


def test_groups_by_array_and_by_layer():
    params = {
        "encoder": {
            "embeddings": {"word": jnp.zeros((5, 2))},
            "layer_0": {"attention": {"query": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}},
            "layer_1": {"attention": {"query": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}},
        },
        "classifier": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)},
    }
    by_array = allocation.make_groups(params, "array")
    assert by_array.num_groups == 7
    by_layer = allocation.make_groups(params, "layer")
    assert set(by_layer.names) == {"classifier", "encoder/embeddings", "encoder/layer_0", "encoder/layer_1"}
    assert dict(zip(by_layer.names, by_layer.sizes.tolist()))["encoder/layer_0"] == 6
    with pytest.raises(ValueError, match="grouping='rows' is not one of"):
        allocation.make_groups(params, "rows")


@pytest.mark.parametrize("rho", [1.5, 2.0, 4.0])
def test_no_allocation_goes_below_the_worst_case_scale(rho):
    """The literal variant's epsilon rests on this bound (METHOD.md)."""
    rng = np.random.default_rng(int(rho * 10))
    sizes = np.array([2, 384, 3072, 3072, 147456, 16])
    bound = allocation.min_noise_scale(sizes, rho)
    lowest = np.inf
    for gamma in (-1.0, -0.5, 0.5, 1.0, 3.0):
        for _ in range(200):
            # Heavy-tailed importances, some exactly zero: the extremes the clip meets.
            scores = rng.lognormal(0.0, 4.0, size=sizes.size) * (rng.random(sizes.size) > 0.2)
            scales = np.asarray(allocation.noise_scales(scores, sizes, gamma=gamma, rho=rho))
            lowest = min(lowest, scales.min())
    assert lowest >= bound * (1 - 1e-6)
    # The bound is attained: the smallest group at amplitude 1/rho, every other at rho.
    extreme = np.where(sizes == sizes.min(), 1e6, 1e-9)
    attained = np.asarray(allocation.noise_scales(extreme, sizes, gamma=1.0, rho=rho)).min()
    assert attained == pytest.approx(bound, rel=1e-5)


def test_worst_case_scale_edge_cases():
    assert allocation.min_noise_scale(np.array([10]), 4.0) == 1.0
    assert allocation.min_noise_scale(np.array([3, 5]), 1.0) == pytest.approx(1.0)
    # Far more parameters elsewhere: about 1/rho^2.
    assert allocation.min_noise_scale(np.array([1, 10**9]), 2.0) == pytest.approx(0.25, rel=1e-6)
    with pytest.raises(ValueError, match="rho=0.5 must be >= 1"):
        allocation.min_noise_scale(np.array([1, 2]), 0.5)
