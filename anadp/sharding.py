"""Device placement: a data-parallel mesh, sharded batches, replicated state.

On one device (one process) every function here is the identity or close to
it, so a one-device run computes exactly what it did before. On several:

- `data_mesh()` is a one-axis mesh ("data") over all devices of all processes.
- A physical batch is padded (`padded_batch_size`) so that its rows split
  evenly over the devices, and each device's rows into microbatches; padded
  rows have mask 0 and contribute exactly nothing.
- `put_batch` builds the global, data-sharded batch. Every process derives
  the same global batch (the Poisson draw depends only on (seed, step)) and
  loads only the rows of its own devices.
- `sum_over_devices` runs the clipped-sum function on each device's rows
  (per-example clipping and microbatching stay local) and adds the results
  across devices (`psum`). The noise is added afterwards, in a jitted function
  whose inputs are all replicated: every device draws the same noise from the
  same replicated key, so no device adds its own noise and every device ends
  the step with the same noisy gradient and parameters.
- `replicate` puts the train state on every device; `to_host` brings a
  sharded result (eval logits) back to every process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def is_main_process() -> bool:
    """Only process 0 writes config.json, metrics, plots and the summary (all processes join orbax saves)."""
    return jax.process_index() == 0


def num_devices() -> int:
    """Devices over all processes: the size of the data axis."""
    return jax.device_count()


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding() -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    return NamedSharding(data_mesh(), PartitionSpec(DATA_AXIS))


def replicated_sharding() -> NamedSharding:
    return NamedSharding(data_mesh(), PartitionSpec())


def padded_batch_size(rows: int, microbatch_size: int | None = None, devices: int | None = None) -> int:
    """The smallest row count >= `rows` that splits evenly over the devices and microbatches.

    The result splits into `devices` equal per-device parts, and each part is
    either at most one microbatch or a whole number of microbatches (the
    microbatch size is per device). One device and a microbatch size that
    divides `rows` give `rows` itself.
    """
    devices = num_devices() if devices is None else devices
    per_device = -(-rows // devices)
    if microbatch_size is not None and per_device > microbatch_size:
        per_device = -(-per_device // microbatch_size) * microbatch_size
    return per_device * devices


def put_batch(
    load_rows: Callable[[np.ndarray], Any], mask: np.ndarray, num_rows: int
) -> tuple[Any, Any]:
    """The global batch of `num_rows` rows, sharded along the data axis, and its mask.

    Args:
      load_rows: `load_rows(ids)` returns a tree of NumPy arrays whose leading
        axis holds rows `ids` (int array, values in [0, len(mask))) of the
        physical batch. It is called only for the rows of this process's
        devices, so each host loads only its part.
      mask: [len(mask)] float mask of the physical batch (1 real, 0 padding).
      num_rows: the padded row count (`padded_batch_size`), >= len(mask).
        Rows past len(mask) are copies of row 0 with mask 0.

    Returns:
      (batch, mask): NumPy arrays on one device, global `jax.Array`s sharded
      along the data axis on several (also across processes).
    """
    mask = np.asarray(mask, np.float32)
    if num_rows < len(mask):
        raise ValueError(f"num_rows={num_rows} is smaller than the batch ({len(mask)} rows)")

    def rows_of(ids):
        real = ids < len(mask)
        ids = np.where(real, ids, 0)
        return load_rows(ids), np.where(real, mask[ids], np.float32(0))

    if num_devices() == 1:
        return rows_of(np.arange(num_rows))
    if num_rows % num_devices():
        raise ValueError(f"num_rows={num_rows} is not a multiple of the {num_devices()} devices")
    sharding = batch_sharding()
    index_map = sharding.addressable_devices_indices_map((num_rows,))
    devices, parts = [], []
    for device, index in index_map.items():
        devices.append(device)
        parts.append(rows_of(np.arange(num_rows)[index[0]]))
    flat_parts = [jax.tree_util.tree_flatten(p) for p in parts]
    treedef = flat_parts[0][1]

    def assemble(leaf_index):
        shards = [jax.device_put(leaves[leaf_index], d) for (leaves, _), d in zip(flat_parts, devices)]
        shape = (num_rows,) + shards[0].shape[1:]
        return jax.make_array_from_single_device_arrays(shape, sharding, shards)

    return treedef.unflatten([assemble(i) for i in range(treedef.num_leaves)])


def replicate(tree: Any) -> Any:
    """Places the same copy of `tree` on every device (of every process).

    Every process must pass the same values (same seed, same checkpoint).
    """
    if num_devices() == 1:
        return tree
    sharding = replicated_sharding()

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(put, tree)


def to_host(x: Any) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) array as one NumPy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def sum_over_devices(fn: Callable, num_replicated: int) -> Callable:
    """Runs `fn` on each device's rows and adds the results over the devices.

    `fn(*replicated, *sharded)`: the first `num_replicated` arguments (params,
    noise scales) are the same on every device; the others (batch, mask) have
    a leading batch axis split over the data axis. Each device calls `fn` on
    its own rows, so per-example gradients, clipping and the microbatch scan
    stay on the device that holds the examples; the per-device results
    (clipped sums) are then summed with one `psum`, and the sum is replicated.
    On one device this is `fn` itself. Wrap the result in `jax.jit`.

    `check_vma=False` is deliberate: inside, gradients with respect to the
    replicated arguments are device-local (each device's own examples), and
    the one `psum` here is the only cross-device sum. (With JAX's default
    `check_vma=True`, differentiating with respect to a replicated argument
    would sum the cotangents across devices inside `fn`, i.e. add gradients
    of different examples before they are clipped; and the microbatch scan
    in `clipping.clipped_grad_sum` starts from a device-invariant zero carry,
    which that mode rejects.) tests/test_sharding.py checks per-example
    results against the one-device computation.
    """
    if num_devices() == 1:
        return fn

    def local(*args):
        return jax.lax.psum(fn(*args), DATA_AXIS)

    @functools.wraps(fn)
    def wrapped(*args):
        in_specs = (PartitionSpec(),) * num_replicated + (PartitionSpec(DATA_AXIS),) * (len(args) - num_replicated)
        return jax.shard_map(
            local, mesh=data_mesh(), in_specs=in_specs, out_specs=PartitionSpec(), check_vma=False
        )(*args)

    return wrapped


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Starts JAX's multi-host runtime; call before any JAX computation.

    With no arguments, `jax.distributed.initialize` detects the cluster from
    its environment (SLURM, Cloud TPU, Open MPI); explicit flags override it.
    """
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
