"""From a grid to its cells: each cell's effective config, name and launch.py command.

Cell names: `<task>-<finetune>-<method>[-global][-<importance>-g<gamma>-r<rho>]
-eps<target>-seed<seed>` (non-private cells have no epsilon; `sigma<z>`
replaces `eps<target>` when privacy.noise_multiplier is set). They are built
from the cell's effective config, so the same run has the same name in every
grid: grids run into one shared root reuse each other's cells.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shlex
import sys
from typing import Any

from experiments.formatting import short_number
from experiments.grids import GRIDS, PINNED, Grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG_CACHE: dict[str, Any] = {}


def load_config(spec: str):
    """The ConfigDict of `path[:argument]`, as launch.py's --config would build it (a fresh copy)."""
    if spec not in _CONFIG_CACHE:
        path, _, arg = spec.partition(":")
        full = path if os.path.isabs(path) else os.path.join(REPO, path)
        module_spec = importlib.util.spec_from_file_location(f"_grid_config_{len(_CONFIG_CACHE)}", full)
        if module_spec is None or not os.path.exists(full):
            raise ValueError(f"no config file {full}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _CONFIG_CACHE[spec] = module.get_config(arg) if arg else module.get_config()
    return _CONFIG_CACHE[spec].copy_and_resolve_references()


def _field(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
            raise ValueError(f"unknown config field {dotted!r}")
        node = node[part]
    return node


def coerce(config, dotted: str, value: Any) -> Any:
    """`value` (a string from --set, or a Python value) as the type of config field `dotted`."""
    current = _field(config, dotted)
    if hasattr(current, "keys"):
        raise ValueError(f"config field {dotted!r} is a group, not a value")
    if isinstance(current, bool):
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(f"{dotted}={value!r}: expected true or false")
            return lowered in ("true", "1")
        return bool(value)
    if isinstance(current, int):
        number = float(value)
        if not number.is_integer():
            raise ValueError(f"{dotted}={value!r}: expected an integer")
        return int(number)
    if isinstance(current, float):
        return float(value)
    return str(value)


def _apply(config, overrides: dict[str, Any]) -> None:
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value


def flag_value(value: Any) -> str:
    """A typed value as launch.py's flags read it back (floats in full precision)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# Fields a cell name always states (for the methods they matter to); any other
# field a grid's template sets is appended as <leaf><value>.
_NAMED_FIELDS = {
    "data.task", "model.finetune", "privacy.method", "privacy.epsilon", "privacy.noise_multiplier",
    "privacy.clipping", "privacy.importance", "privacy.gamma", "privacy.rho", "train.seed",
}


def cell_name(config, extra: dict[str, Any]) -> str:
    p = config.privacy
    parts = [config.data.task, config.model.finetune, p.method]
    if p.method == "anadp":
        if p.clipping != "elliptical":
            parts.append(p.clipping)
        parts += [p.importance, f"g{short_number(p.gamma)}", f"r{short_number(p.rho)}"]
    for dotted, value in extra.items():
        if dotted not in _NAMED_FIELDS:
            text = flag_value(value).replace("/", "_").replace(",", "+").replace(" ", "")
            parts.append(f"{dotted.rsplit('.', 1)[-1]}{text}")
    if p.method != "non_private":
        parts.append(f"sigma{short_number(p.noise_multiplier)}" if p.noise_multiplier > 0
                     else f"eps{short_number(p.epsilon)}")
    parts.append(f"seed{config.train.seed}")
    return "-".join(parts)


@dataclasses.dataclass
class Cell:
    name: str
    config_file: str
    overrides: dict[str, Any]  # dotted field -> typed value (template, seed, then --set)
    workdir: str  # as passed to launch.py (relative to the repository when inside it)
    effective: dict  # the resolved config, as a nested dict

    @property
    def command(self) -> list[str]:
        return [sys.executable, "launch.py", f"--config={self.config_file}", f"--workdir={self.workdir}",
                *(f"--config.{k}={flag_value(v)}" for k, v in self.overrides.items())]

    @property
    def command_text(self) -> str:
        return shlex.join(self.command)

    def path(self) -> str:
        return self.workdir if os.path.isabs(self.workdir) else os.path.join(REPO, self.workdir)


def parse_sets(sets: list[str] | None) -> list[tuple[str, str]]:
    """--set=a.b=v flags as (field, text) pairs; a leading `config.` is dropped."""
    out = []
    for item in sets or []:
        key, sep, value = item.partition("=")
        key = key.strip().removeprefix("config.")
        if not sep or not key:
            raise ValueError(f"--set={item!r}: expected field.path=value")
        out.append((key, value))
    return out


def parse_seeds(text: str | None) -> tuple[int, ...] | None:
    if text is None or not text.strip():
        return None
    return tuple(int(s) for s in text.split(",") if s.strip())


def split_list(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated flag values, flattened."""
    return [v for item in values or [] for v in item.split(",") if v.strip()]


def config_for_command(command: list[str]) -> dict:
    """The resolved config (a nested dict) a launch.py command runs: its --config file,
    then its --config.<field>=<value> flags in order (launch.py's other flags are ignored)."""
    spec = next((a.split("=", 1)[1] for a in command if a.startswith("--config=")), "configs/default.py")
    config = load_config(spec)
    for arg in command:
        if arg.startswith("--config.") and "=" in arg:
            dotted, text = arg[len("--config."):].split("=", 1)
            _apply(config, {dotted: coerce(config, dotted, text)})
    return config.to_dict()


def path_for_commands(path: str) -> str:
    """A path as commands and tables show it: relative to the repository when inside it."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, REPO)
    return path if rel.startswith("..") else rel


def matches(name: str, only: list[str] | None) -> bool:
    """--only: every flag must match, a flag matches when one of its comma-separated parts is in the name."""
    return all(any(alt and alt in name for alt in group.split(",")) for group in (only or []))


def _overrides(config, template: dict[str, Any], seed: int, set_pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """A cell's typed overrides in command-line order: the pinned recipe, the template,
    the seed, then --set (a later value of a field replaces an earlier one)."""
    overrides: dict[str, Any] = {}
    # Seeded randomness: cells that share a seed share their batches and noise, which
    # is what pairs them; every summary records the mode (METHOD.md, "Randomness").
    for dotted, value in {**PINNED, **template, "train.seed": seed, "privacy.randomness": "seeded"}.items():
        overrides[dotted] = coerce(config, dotted, value)
    for dotted, text in set_pairs:
        overrides.pop(dotted, None)  # --set wins, and goes last on the command line
        overrides[dotted] = coerce(config, dotted, text)
    return overrides


def plan(grid: str | Grid, root: str, *, seeds=None, sets: list[str] | None = None,
         only: list[str] | None = None) -> list[Cell]:
    """The grid's cells, in order, with --set applied and --only filtered; duplicates merged."""
    spec = GRIDS[grid] if isinstance(grid, str) else grid
    set_pairs = parse_sets(sets)
    root_text = path_for_commands(root)
    cells: dict[str, Cell] = {}
    for seed in seeds or spec.seeds:
        for config_file, template in spec.templates:
            config = load_config(config_file)
            overrides = _overrides(config, template, seed, set_pairs)
            _apply(config, overrides)
            name = cell_name(config, {k: overrides[k] for k in template})
            if not matches(name, only):
                continue
            cell = Cell(name, config_file, overrides, os.path.join(root_text, name), config.to_dict())
            if name in cells:
                if cells[name].effective != cell.effective or cells[name].config_file != config_file:
                    raise ValueError(f"two different cells are both named {name}: "
                                     f"{cells[name].command_text} / {cell.command_text}")
                continue
            cells[name] = cell
    return list(cells.values())
