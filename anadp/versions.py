"""What a run's summary records of its software and machine."""

from __future__ import annotations

import platform

import jax
import numpy as np
import optax


def versions() -> dict:
    """The library versions and the machine a run ran on, for its summary."""
    import flax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "platform": jax.default_backend(),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "machine": platform.machine(),
    }
