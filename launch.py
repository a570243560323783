"""Launches one fine-tuning run: `python launch.py [--config=configs/<file>.py[:arg]] [--workdir=...]`.

With no flags it runs the offline default (configs/default.py: MiniLM-L6 with
LoRA on Rotten Tomatoes, ANADP at epsilon 3) into ./runs/default. Any config
field can be overridden, e.g. `--config.privacy.epsilon=8`.
"""

import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
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
        print(f"error: {e}", file=sys.stderr)
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
