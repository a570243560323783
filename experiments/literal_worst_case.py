"""The worst-case epsilon of literal (global-clipping) ANADP runs that predate it.

Runs made before `train.run` accounted the literal variant at its worst case
report the epsilon of their realised sequence of multipliers, which is not a
guarantee (the allocation is chosen adaptively; METHOD.md). This recomputes,
from each run's summary and its model's parameter groups, what the run now
reports: the first max(1, warmup) steps at sigma, every other step at
sigma * s_min (`allocation.min_noise_scale`).

    python experiments/literal_worst_case.py --root=experiments/results/runs/rt_main \
        --out=experiments/results/rt_literal_worst_case.md
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worst_case(summary: dict) -> tuple[float, float]:
    """(s_min, epsilon) for one literal run's summary."""
    from anadp import accounting, models, train
    from anadp.data import tasks
    from anadp.task_and_model import build_model
    from configs import base

    # Summaries written before a config field existed lack it: take today's default.
    config = base.get_config()
    for group, fields in summary["config"].items():
        for field, value in fields.items():
            config[group][field] = value
    num_labels = tasks.get_task(summary["task"]).num_labels
    _, params = build_model(config, num_labels)
    trainable, _ = models.partition(params, config.model.finetune)
    mechanism = train.mechanism_from_config(config, noise_multiplier=summary["noise_multiplier"],
                                 expected_batch_size=summary["expected_batch_size"])
    s_min = mechanism.worst_case_scale(trainable)
    ledger = accounting.PrivacyLedger(config.privacy.accountant, reference_noise_multiplier=summary["noise_multiplier"])
    for step in range(summary["steps"]):
        ledger.record(summary["sampling_rate"], mechanism.accounted_noise_multiplier(step, s_min))
    return s_min, ledger.epsilon(summary["delta"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for path in sorted(glob.glob(os.path.join(args.root, "*", "summary.json"))):
        with open(path) as f:
            s = json.load(f)
        if s.get("method") != "anadp" or s.get("clipping") != "global":
            continue
        s_min, eps = worst_case(s)
        realised = s.get("epsilon_realised_sequence_not_a_guarantee", s["epsilon"])
        name = os.path.basename(os.path.dirname(path))
        rows.append((s["target_epsilon"], s["noise_multiplier"], s_min, realised, eps, name))
    lines = [
        "| target ε (DP-SGD's claim) | sigma | worst-case s_min | ε of the realised sequence (not a guarantee) "
        "| worst-case ε (the guarantee) | run |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {t:g} | {z:.4f} | {s:.4f} | {r:.3g} | **{e:.4g}** | `{n}` |" for t, z, s, r, e, n in sorted(rows)]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
