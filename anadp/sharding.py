"""Device placement: a data-parallel mesh, sharded batches, replicated state.

On one device every function here is the identity. On several, a batch is
split along its leading axis over the mesh's "data" axis, each device clips
the examples it holds, `jit` reduces the clipped sums across devices, and the
noise, drawn from the replicated key, is the same on every device.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def is_main_process() -> bool:
    """Only process 0 writes checkpoints, metrics and plots."""
    return jax.process_index() == 0


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def shard_batch(tree: Any) -> Any:
    """Places arrays with a leading batch axis across the devices (split on axis 0)."""
    if jax.device_count() == 1:
        return tree
    sharding = NamedSharding(data_mesh(), PartitionSpec(DATA_AXIS))
    return jax.device_put(tree, sharding)


def replicate(tree: Any) -> Any:
    """Places the same copy of `tree` on every device."""
    if jax.device_count() == 1:
        return tree
    return jax.device_put(tree, NamedSharding(data_mesh(), PartitionSpec()))


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Starts JAX's multi-host runtime.

    With no arguments, `jax.distributed.initialize` reads the cluster's
    environment (SLURM, TPU pods, Open MPI); explicit flags override it.
    """
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
