"""Launches one fine-tuning run: `python launch.py [--config=configs/<file>.py[:arg]] [--workdir=...]`.

With no flags it runs the offline default (configs/default.py: MiniLM-L6, full
fine-tuning on Rotten Tomatoes, ANADP at epsilon 3) into ./runs/default. Any config
field can be overridden, e.g. `--config.privacy.epsilon=8`.
"""

import difflib
import importlib.util
import json
import logging
import os
import re
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")


def config_flag_error(argv: list[str]) -> str | None:
    """What is wrong with the --config and --config.<field> flags, in one line, or None.

    config_flags loads the config and applies the overrides while the flags are
    defined (without --config) or parsed, and reports an unknown field as a
    KeyError traceback, a missing file only when the config is first read; so
    both are checked here first."""
    spec = DEFAULT_CONFIG
    for i, arg in enumerate(argv[1:], start=1):
        if re.fullmatch(r"--?config", arg) and i + 1 < len(argv):
            spec = argv[i + 1]
        elif re.match(r"--?config=", arg):
            spec = arg.split("=", 1)[1]
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        return (f"--config={spec}: no such config file (a Python file with get_config(), e.g. "
                "configs/default.py or configs/glue.py:mnli)")
    config = load_config(spec)
    for arg in argv[1:]:
        override = re.match(r"--?(?:no)?config\.([^=]+)", arg)
        if override:
            problem = unknown_field(config, override.group(1))
            if problem:
                return f"{arg}: {problem}"
    return None


def module_from_file(name: str, path: str):
    """The module in the file `path`, executed as `name` without importing its package."""
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`get_config(argument)` of `path[:argument]`, as config_flags calls it."""
    path, *argument = spec.split(":", 1)
    return module_from_file("_launch_config_check", path).get_config(*argument)


def unknown_field(config: ml_collections.ConfigDict, dotted: str) -> str | None:
    """Why `config.<dotted>` is not a field (naming the fields there are), or None."""
    node, where = config, "config"
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict):
            return f"{where} is a value, not a group of fields"
        if part not in node:
            fields = sorted(node.keys())
            close = difflib.get_close_matches(part, fields, 1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return f"{where} has no field {part!r} ({hint}its fields: {', '.join(fields)})"
        node, where = node[part], f"{where}.{part}"
    return None


if __name__ == "__main__":
    # Malloc settings for XLA's per-step buffers, before anything else: loaded by
    # path, since importing the anadp package (jax) here would be done again
    # by the re-executed process.
    module_from_file("_anadp_heap", os.path.join(os.path.dirname(os.path.abspath(__file__)), "anadp", "heap.py")
                     ).reexec_with_heap_settings()
    # Before DEFINE_config_file, which would already raise on an unknown field.
    _problem = config_flag_error(sys.argv)
    if _problem:
        print(f"error: {_problem}", file=sys.stderr)
        sys.exit(2)

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    DEFAULT_CONFIG,
    "Path to an ml_collections config file, optionally with ':argument'.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where the run writes everything (resumes if present).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (else read from the cluster's environment)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Initialise jax.distributed (from the flags above or SLURM / TPU environment)."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Library chatter (orbax logs every checkpoint step at INFO) stays out of the way.
    logging.getLogger("absl").setLevel(logging.WARNING)
    from anadp import sharding, train

    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DISTRIBUTED.value or any(v is not None for v in explicit):
        sharding.initialize_distributed(*explicit)
    if sharding.num_devices() > 1 and sharding.is_main_process():
        import jax

        print(f"data parallel over {sharding.num_devices()} {jax.default_backend()} devices "
              f"in {jax.process_count()} process(es)", file=sys.stderr)
    try:
        summary = train.run(_CONFIG.value, _WORKDIR.value)
    except ValueError as e:
        # Configuration and input errors: one clear line, no traceback.
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    if sharding.is_main_process():
        metric = summary["main_metric"]
        eps = summary["epsilon"]
        eps_text = "inf (non-private)" if eps == float("inf") else f"{eps:.3f} (delta={summary['delta']:.1e})"
        print(
            f"\n{summary['task']} {summary['method']} ({summary['finetune']}): "
            f"dev {metric} {summary['eval'][metric]:.4f}, epsilon {eps_text}, "
            f"{summary['steps']} steps, {summary['nonprivate/wall_time_s']:.0f} s"
        )
        print(f"workdir: {os.path.abspath(_WORKDIR.value)}")
        print(json.dumps({k: summary[k] for k in ("eval", "epsilon", "delta", "noise_multiplier", "randomness")}))


if __name__ == "__main__":
    app.run(main)
