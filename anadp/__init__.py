"""ANADP: adaptive noise allocation for differentially private fine-tuning."""

from anadp import accounting, allocation, calibration, clipping, importance, noise, sampling
from anadp.clipping import GradientSum, clipped_grad_sum, clipped_sum, per_example_grads
from anadp.noise import Mechanism, MechanismState, dp_aggregate, privatize

__all__ = [
    "GradientSum",
    "accounting",
    "allocation",
    "calibration",
    "clipping",
    "importance",
    "noise",
    "sampling",
    "Mechanism",
    "MechanismState",
    "clipped_grad_sum",
    "clipped_sum",
    "dp_aggregate",
    "per_example_grads",
    "privatize",
]
