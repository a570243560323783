"""Poisson sampling on the host (NumPy), padded to a fixed physical batch shape.

This is the sampling the accountant assumes (METHOD.md, "Sampling"): at every
step each of the ``N`` examples is included independently with probability
``q``. The realised batch size is random; the mechanism divides by the
*expected* size ``q N`` (:attr:`PoissonSampler.expected_batch_size`), never by
the realised one.

To let ``jit`` compile once, a draw is split into passes of a fixed physical
shape ``[physical_batch_size]`` with a mask; padded rows have mask 0 and must
contribute exactly zero. A draw larger than the physical shape is processed in
more passes; it is never truncated.

Step ``t``'s draw depends only on ``(seed, t)`` (``np.random.default_rng([seed, t])``),
so resuming a run at step ``t`` needs only the step index.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from anadp import _checks

__all__ = [
    "PhysicalBatch",
    "PoissonSampler",
    "sampling_rate_for",
    "steps_for_epochs",
]


def sampling_rate_for(expected_batch_size: float, num_examples: int) -> float:
    """Poisson rate ``q = expected_batch_size / num_examples``, in (0, 1]."""
    n = _checks.integer("num_examples", num_examples, 1)
    b = _checks.real("expected_batch_size", expected_batch_size)
    if not (0.0 < b <= n):
        raise ValueError(
            f"expected_batch_size={expected_batch_size!r} is outside (0, num_examples={n}]")
    return b / n


def steps_for_epochs(epochs: float, sampling_rate: float) -> int:
    """Number of steps that visit each example ``epochs`` times in expectation: ``round(epochs / q)`` (>= 1)."""
    e = _checks.in_interval("epochs", epochs, "(0, inf)")
    q = _checks.sampling_rate(sampling_rate)
    return max(1, round(e / q))


class PhysicalBatch(NamedTuple):
    """One pass of a step's draw, padded to the physical shape.

    ``indices``: int32 ``[physical_batch_size]`` example indices (padded rows
    hold index 0, a valid index, and must be ignored). ``mask``: float32
    ``[physical_batch_size]``, 1.0 for sampled rows and 0.0 for padding.
    """

    indices: np.ndarray
    mask: np.ndarray

    @property
    def num_real(self) -> int:
        """Number of sampled (unmasked) rows in this pass."""
        return int(np.count_nonzero(self.mask))


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class PoissonSampler:
    """Poisson sampler: each example is in step ``t``'s batch independently with probability ``q``.

    Args:
        num_examples: dataset size ``N`` (>= 1).
        sampling_rate: ``q`` in (0, 1].
        physical_batch_size: rows per pass (>= 1); a draw of ``n`` examples is
            processed in ``max(1, ceil(n / physical_batch_size))`` passes.
        seed: non-negative integer; step ``t`` uses ``np.random.default_rng([seed, t])``.
    """

    num_examples: int
    sampling_rate: float
    physical_batch_size: int
    seed: int

    def __post_init__(self):
        # Checked and stored as Python numbers (a frozen dataclass sets its own fields here only).
        for name, value in (
            ("num_examples", _checks.integer("num_examples", self.num_examples, 1)),
            ("sampling_rate", _checks.sampling_rate(self.sampling_rate)),
            ("physical_batch_size", _checks.integer("physical_batch_size", self.physical_batch_size, 1)),
            ("seed", _checks.integer("seed", self.seed, 0)),
        ):
            object.__setattr__(self, name, value)

    @property
    def expected_batch_size(self) -> float:
        """``q * N``: the mechanism's denominator (never the realised batch size)."""
        return self.sampling_rate * self.num_examples

    def __repr__(self) -> str:
        # No seed: it may be a run's secret (anadp.randomness), and reprs end up in logs.
        return (f"PoissonSampler(num_examples={self.num_examples}, sampling_rate={self.sampling_rate}, "
                f"physical_batch_size={self.physical_batch_size})")

    def sample(self, step: int) -> np.ndarray:
        """Sorted int64 indices of the examples drawn at ``step`` (may be empty)."""
        t = _checks.integer("step", step, 0)
        rng = np.random.default_rng([self.seed, t])
        return np.flatnonzero(rng.random(self.num_examples) < self.sampling_rate)

    def num_passes(self, step: int) -> int:
        """Passes needed for ``step``'s draw (at least one)."""
        return max(1, -(-len(self.sample(step)) // self.physical_batch_size))

    def batches(self, step: int, sort_by: np.ndarray | None = None) -> list[PhysicalBatch]:
        """``step``'s draw split into padded passes; every drawn index appears exactly once.

        ``sort_by`` (one public key per example, e.g. its token count) orders the
        draw before it is split, so that passes hold examples of similar length
        and can be cut to short buckets. The passes of a step are summed before
        noise is added, so the order changes nothing but the cost.
        """
        drawn = self.sample(step)
        if sort_by is not None:
            drawn = drawn[np.argsort(np.asarray(sort_by)[drawn], kind="stable")]
        p = self.physical_batch_size
        passes = max(1, -(-len(drawn) // p))
        out = []
        for i in range(passes):
            chunk = drawn[i * p:(i + 1) * p]
            indices = np.zeros((p,), np.int32)
            mask = np.zeros((p,), np.float32)
            indices[:len(chunk)] = chunk
            mask[:len(chunk)] = 1.0
            out.append(PhysicalBatch(indices=indices, mask=mask))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Configuration (python ints/floats). Resumption needs only this and the step index."""
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PoissonSampler:
        return cls(
            num_examples=int(np.asarray(state["num_examples"])),
            sampling_rate=float(np.asarray(state["sampling_rate"])),
            physical_batch_size=int(np.asarray(state["physical_batch_size"])),
            seed=int(np.asarray(state["seed"])),
        )
