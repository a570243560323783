"""Tests for anadp.sampling: Poisson sampling, padding, validation."""
import math

import numpy as np
import pytest

from anadp.sampling import (
    PhysicalBatch,
    PoissonSampler,
    sampling_rate_for,
    steps_for_epochs,
)


def test_inclusion_rate_matches_q():
    n, q, steps = 2000, 0.05, 200
    sampler = PoissonSampler(n, q, physical_batch_size=128, seed=3)
    counts = np.zeros(n)
    sizes = []
    for t in range(steps):
        idx = sampler.sample(t)
        counts[idx] += 1
        sizes.append(len(idx))
    total = counts.sum()
    # total draws ~ Binomial(n * steps, q)
    se = math.sqrt(n * steps * q * (1 - q))
    assert abs(total - n * steps * q) < 4 * se
    # batch sizes vary (Poisson sampling, not fixed-size batches)
    assert np.std(sizes) > 0.5 * math.sqrt(n * q * (1 - q))
    # every example is included at rate q: per-example counts ~ Binomial(steps, q)
    per_ex_se = math.sqrt(steps * q * (1 - q))
    assert abs(counts.mean() - steps * q) < 4 * per_ex_se / math.sqrt(n)
    assert counts.std() == pytest.approx(per_ex_se, rel=0.15)
    assert sampler.expected_batch_size == pytest.approx(q * n)


def test_deterministic_per_seed_and_step():
    a = PoissonSampler(1000, 0.1, 64, seed=7)
    b = PoissonSampler(1000, 0.1, 64, seed=7)
    c = PoissonSampler(1000, 0.1, 64, seed=8)
    # order of calls does not matter: step t depends only on (seed, t)
    later_first = b.sample(5)
    np.testing.assert_array_equal(a.sample(5), later_first)
    np.testing.assert_array_equal(a.sample(5), a.sample(5))
    assert not np.array_equal(a.sample(5), a.sample(6))
    assert not np.array_equal(a.sample(5), c.sample(5))
    for x, y in zip(a.batches(3), b.batches(3)):
        np.testing.assert_array_equal(x.indices, y.indices)
        np.testing.assert_array_equal(x.mask, y.mask)
    # resuming from the configuration alone reproduces the draws
    r = PoissonSampler.from_state_dict(a.state_dict())
    np.testing.assert_array_equal(r.sample(11), a.sample(11))


def test_sample_is_sorted_unique_in_range():
    s = PoissonSampler(500, 0.3, 32, seed=0)
    idx = s.sample(0)
    assert idx.ndim == 1 and np.issubdtype(idx.dtype, np.integer)
    assert np.all(np.diff(idx) > 0)
    assert idx.min() >= 0 and idx.max() < 500


def test_oversized_draw_is_split_not_truncated():
    s = PoissonSampler(1000, 0.2, physical_batch_size=16, seed=1)
    drawn = s.sample(4)
    assert len(drawn) > 3 * 16
    batches = s.batches(4)
    assert len(batches) == math.ceil(len(drawn) / 16) == s.num_passes(4)
    for b in batches:
        assert isinstance(b, PhysicalBatch)
        assert b.indices.shape == (16,) and b.mask.shape == (16,)
        assert b.mask.dtype == np.float32
        assert set(np.unique(b.mask)) <= {0.0, 1.0}
    real = np.concatenate([b.indices[b.mask > 0] for b in batches])
    # every sampled index exactly once
    assert len(real) == len(drawn)
    np.testing.assert_array_equal(np.sort(real), drawn)
    assert sum(b.num_real for b in batches) == len(drawn)


def test_padding_rows_are_masked():
    s = PoissonSampler(300, 0.1, physical_batch_size=64, seed=2)
    for t in range(5):
        drawn = s.sample(t)
        batches = s.batches(t)
        last = batches[-1]
        n_last = len(drawn) - 64 * (len(batches) - 1)
        assert last.num_real == n_last
        # real rows first, padding after, padding masked and a valid index
        np.testing.assert_array_equal(last.mask[:n_last], 1.0)
        np.testing.assert_array_equal(last.mask[n_last:], 0.0)
        assert np.all((last.indices >= 0) & (last.indices < 300))
        for b in batches[:-1]:
            assert b.num_real == 64


def test_exact_multiple_has_no_extra_pass():
    # q = 1 draws everything: 100 examples in passes of 25 -> exactly 4 full passes
    s = PoissonSampler(100, 1.0, 25, seed=0)
    batches = s.batches(0)
    assert len(batches) == 4
    assert all(b.num_real == 25 for b in batches)


def test_empty_draw_yields_one_masked_batch():
    s = PoissonSampler(3, 1e-9, physical_batch_size=8, seed=0)
    assert len(s.sample(0)) == 0
    batches = s.batches(0)
    assert len(batches) == 1
    assert batches[0].indices.shape == (8,)
    np.testing.assert_array_equal(batches[0].mask, np.zeros(8, np.float32))
    assert batches[0].num_real == 0


def test_helpers():
    assert sampling_rate_for(256, 67_349) == pytest.approx(256 / 67_349)
    assert sampling_rate_for(10, 10) == 1.0
    assert steps_for_epochs(3, 0.01) == 300
    assert steps_for_epochs(1, 0.3) == 3
    assert steps_for_epochs(0.001, 0.5) == 1


@pytest.mark.parametrize("args,match", [
    ((0, 0.1, 8, 0), r"num_examples=0 must be an integer >= 1"),
    ((10, 0.0, 8, 0), r"sampling_rate=0\.0 is outside \(0, 1\]"),
    ((10, 1.5, 8, 0), r"sampling_rate=1\.5 is outside \(0, 1\]"),
    ((10, 0.1, 0, 0), r"physical_batch_size=0 must be an integer >= 1"),
    ((10, 0.1, 2.5, 0), r"physical_batch_size=2\.5 must be an integer >= 1"),
    ((10, 0.1, 8, -1), r"seed=-1 must be an integer >= 0"),
])
def test_sampler_validation(args, match):
    with pytest.raises(ValueError, match=match):
        PoissonSampler(*args)


def test_step_and_helper_validation():
    s = PoissonSampler(10, 0.5, 4, seed=0)
    with pytest.raises(ValueError, match=r"step=-1 must be an integer >= 0"):
        s.sample(-1)
    with pytest.raises(ValueError, match=r"step=1\.5 must be an integer"):
        s.batches(1.5)
    with pytest.raises(ValueError, match=r"expected_batch_size=20 is outside \(0, num_examples=10\]"):
        sampling_rate_for(20, 10)
    with pytest.raises(ValueError, match=r"expected_batch_size=0 is outside"):
        sampling_rate_for(0, 10)
    with pytest.raises(ValueError, match=r"num_examples=-5 must be an integer >= 1"):
        sampling_rate_for(1, -5)
    with pytest.raises(ValueError, match=r"epochs=0 is outside \(0, inf\)"):
        steps_for_epochs(0, 0.1)
    with pytest.raises(ValueError, match=r"sampling_rate=2 is outside \(0, 1\]"):
        steps_for_epochs(1, 2)


def test_sorting_by_length_keeps_every_index_once_and_groups_lengths():
    from anadp.sampling import PoissonSampler

    lengths = np.random.default_rng(3).integers(1, 100, size=500)
    sampler = PoissonSampler(500, 0.3, 16, seed=1)
    batches = sampler.batches(7, sort_by=lengths)
    real = np.concatenate([b.indices[b.mask.astype(bool)] for b in batches])
    assert sorted(real.tolist()) == sampler.sample(7).tolist()
    maxima = [lengths[b.indices[b.mask.astype(bool)]].max() for b in batches]
    assert maxima == sorted(maxima)
