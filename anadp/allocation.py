"""Parameter groups and the map from group importance to per-group noise scales.

Everything here is a function of public quantities only (the parameter tree's
structure and an importance vector computed from released values), so its
output is post-processing and costs no privacy (METHOD.md, "From importance to
noise").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from anadp import _checks

GROUPINGS = ("array", "layer")
_LAYER_NAME = re.compile(r"^layer_(\d+)$")


class Groups(NamedTuple):
    """A static partition of a parameter tree's leaves into K groups.

    Attributes:
      names: the K group names, in group order.
      leaf_group: for each leaf (in `jax.tree_util` flattening order), its group index.
      sizes: number of coordinates `d_k` in each group, shape [K] (NumPy, static).
    """

    names: tuple[str, ...]
    leaf_group: tuple[int, ...]
    sizes: np.ndarray

    @property
    def num_groups(self) -> int:
        return len(self.names)


def key_name(key: Any) -> str:
    """A path entry as a string: a plain str, or a jax key-path entry."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_paths(tree: Any) -> list[tuple[str, ...]]:
    """Each leaf's path as a tuple of strings, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [tuple(key_name(k) for k in path) for path, _ in flat]


def _group_name(path: tuple[str, ...], grouping: str) -> str:
    if grouping == "array":
        return "/".join(path)
    # grouping == "layer": everything inside `layer_<i>` is one group; a leaf
    # outside the transformer layers (embeddings, pooler, classifier) is grouped
    # with the other leaves of its own module (e.g. a dense layer's kernel and bias).
    for depth, part in enumerate(path):
        if _LAYER_NAME.match(part):
            return "/".join(path[: depth + 1])
    return "/".join(path[:-1]) or path[0]


def make_groups(params: Any, grouping: str = "array") -> Groups:
    """Partitions the leaves of `params` into groups.

    Args:
      params: the trainable parameter tree (only shapes and structure are read).
      grouping: "array" (one group per parameter array: a weight matrix, a bias,
        a LoRA factor) or "layer" (one group per transformer layer `layer_<i>`;
        leaves outside the layers are grouped by their module).
    """
    _checks.one_of("grouping", grouping, GROUPINGS)
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params has no leaves: nothing to group")
    names: list[str] = []
    index: dict[str, int] = {}
    leaf_group = []
    for path in leaf_paths(params):
        name = _group_name(path, grouping)
        if name not in index:
            index[name] = len(names)
            names.append(name)
        leaf_group.append(index[name])
    sizes = np.zeros(len(names), dtype=np.int64)
    for g, leaf in zip(leaf_group, leaves):
        sizes[g] += int(np.prod(np.shape(leaf)))
    return Groups(tuple(names), tuple(leaf_group), sizes)


def group_sum(leaf_values: Sequence[jax.Array], groups: Groups) -> jax.Array:
    """Sums per-leaf values (each of shape [...]) into per-group values [K, ...]."""
    stacked = jnp.stack(list(leaf_values))
    return jax.ops.segment_sum(
        stacked, jnp.asarray(groups.leaf_group), num_segments=groups.num_groups
    )


def broadcast_to_leaves(group_values: jax.Array, groups: Groups, like: Any) -> Any:
    """A tree shaped like `like` whose leaf i is the scalar `group_values[group of i]`."""
    treedef = jax.tree_util.tree_structure(like)
    return jax.tree_util.tree_unflatten(
        treedef, [group_values[g] for g in groups.leaf_group]
    )


def uniform_scales(groups: Groups) -> jax.Array:
    return jnp.ones(groups.num_groups, dtype=jnp.float32)


def check_allocation_args(gamma: float, rho: float, warmup_steps: int) -> None:
    if not np.isfinite(gamma):
        raise ValueError(f"gamma={gamma} must be a finite number (0 gives DP-SGD)")
    _checks.at_least("rho", rho, 1, note=" (1 forces uniform noise)")
    _checks.integer("warmup_steps", warmup_steps, 0)


def min_noise_scale(sizes: np.ndarray, rho: float) -> float:
    """A lower bound on `min_k s_k` over every importance vector (`noise_scales`).

    Every amplitude lies in [1/rho, rho]. Group k's scale
    `a_k sqrt(D / sum_j d_j a_j^2)` grows with `a_k` and shrinks as the others
    grow, so it is smallest at `a_k = 1/rho` with every other amplitude at
    `rho`, and of those cases the smallest group's is the lowest:

        s_min = (1/rho) sqrt(D / (d_min / rho^2 + (D - d_min) rho^2)),  D = sum_j d_j.

    One group (or rho = 1) gives 1. It does not depend on gamma's size (only on
    gamma != 0), which makes it valid for every estimator.
    """
    d = np.asarray(sizes, np.float64)
    if d.size == 0 or np.any(d <= 0):
        raise ValueError(f"group sizes must be positive, got {d.tolist()[:5]}")
    _checks.at_least("rho", rho, 1)
    total, smallest = float(d.sum()), float(d.min())
    if d.size == 1:
        return 1.0
    return float(np.sqrt(total / (smallest / rho**2 + (total - smallest) * rho**2)) / rho)


def noise_scales(
    importance: jax.Array,
    sizes: np.ndarray,
    *,
    gamma: float,
    rho: float,
    min_relative_importance: float = 1e-6,
) -> jax.Array:
    """Per-group noise scales `s_k` from group importances `S_k` (METHOD.md).

        r_k = S_k / mean_j S_j           (floored at `min_relative_importance`)
        a_k = clip(r_k ** (-gamma), 1/rho, rho)
        s_k = a_k * sqrt(sum_j d_j / sum_j d_j a_j^2)

    so that `sum_k d_k s_k^2 = sum_k d_k`: the total noise energy equals
    DP-SGD's at the same multiplier. `gamma = 0` returns exactly ones. When the
    importances carry no information yet (mean <= 0 or not finite), the
    allocation is uniform.
    """
    importance = jnp.asarray(importance, jnp.float32)
    sizes = jnp.asarray(sizes, jnp.float32)
    mean = jnp.mean(importance)
    informative = jnp.isfinite(mean) & (mean > 0)
    relative = jnp.where(informative, importance / jnp.where(informative, mean, 1.0), 1.0)
    relative = jnp.maximum(relative, min_relative_importance)
    amplitude = jnp.clip(relative ** (-gamma), 1.0 / rho, rho)
    total = jnp.sum(sizes)
    return amplitude * jnp.sqrt(total / jnp.sum(sizes * amplitude**2))
