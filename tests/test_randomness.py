"""The run's secret randomness: secure by default, seeded on request, never in a repr."""

import jax
import numpy as np
import pytest

import anadp
from anadp import randomness
from anadp.noise import Mechanism


def test_seeded_secrets_are_the_public_seed():
    s = randomness.draw("seeded", 7)
    np.testing.assert_array_equal(s.noise_key, np.asarray(jax.random.PRNGKey(7)))
    assert s.sampler_seed == 7


def test_secure_secrets_are_fresh_and_survive_the_checkpoint_format():
    a, b = randomness.draw("secure", 0), randomness.draw("secure", 0)
    assert a.sampler_seed != b.sampler_seed and not np.array_equal(a.noise_key, b.noise_key)
    assert a.sampler_seed.bit_length() > 64  # more than any seed a config would hold
    back = randomness.RunSecrets.from_state_dict(a.state_dict())
    assert back.sampler_seed == a.sampler_seed and np.array_equal(back.noise_key, a.noise_key)


def test_secrets_never_show_in_a_repr():
    s = randomness.draw("secure", 0)
    text = repr(s) + str(s)
    assert str(s.sampler_seed) not in text and str(int(s.noise_key[0])) not in text
    sampler = anadp.sampling.PoissonSampler(100, 0.1, 8, s.sampler_seed)
    assert str(s.sampler_seed) not in repr(sampler)


def test_unknown_mode_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match=r"config.privacy.randomness='public' is invalid: must be one of"):
        randomness.draw("public", 0)


def test_mechanism_without_a_seed_draws_a_secret_key_at_every_init():
    params = {"w": np.zeros(3, np.float32)}
    mech = Mechanism(1.0, 1.0, 10.0)
    keys = [np.asarray(mech.init(params).noise_key) for _ in range(2)]
    assert not np.array_equal(*keys)
    seeded = Mechanism(1.0, 1.0, 10.0, seed=3)
    np.testing.assert_array_equal(seeded.init(params).noise_key, jax.random.PRNGKey(3))
    tx = anadp.dp_aggregate(mech)
    assert not np.array_equal(tx.init(params).noise_key, tx.init(params).noise_key)
