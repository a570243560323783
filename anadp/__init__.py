"""ANADP: adaptive noise allocation for differentially private fine-tuning."""

from anadp import accounting, allocation, clipping, importance, noise, sampling
from anadp.clipping import ClippedSum, clipped_grad_sum, clipped_sum, per_example_grads
from anadp.noise import (
    Mechanism,
    MechanismState,
    anadp_aggregate,
    current_scales,
    dp_sgd_aggregate,
    privatize,
)

__all__ = [
    "ClippedSum",
    "accounting",
    "allocation",
    "clipping",
    "importance",
    "noise",
    "sampling",
    "Mechanism",
    "MechanismState",
    "anadp_aggregate",
    "clipped_grad_sum",
    "clipped_sum",
    "current_scales",
    "dp_sgd_aggregate",
    "per_example_grads",
    "privatize",
]
