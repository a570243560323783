"""Noise-scale heatmaps (transformer layer x weight matrix) of finished ANADP runs.

    python experiments/heatmap.py --workdir=experiments/results/runs/rt_main/<cell>
    python experiments/heatmap.py --workdir=<run> --workdir=<run2> --out=figures/ --importance

For each run, reads the per-evaluation records of its metrics.jsonl and draws,
with anadp/plots.py:
  noise_scales.png            s_k per group at the last evaluation (or --step)
  noise_scales_over_time.png  s_k at up to --max_panels evaluations up to it
  importance_over_time.png    the group importance S_k likewise (--importance)
into the run's folder, or into --out as `<run name>_<figure>.png`. A run still
training is drawn up to its latest evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anadp import plots  # noqa: E402


def read_records(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"{workdir}: no metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_description(workdir: str) -> dict:
    """The run's task, method and importance estimator, from summary.json or (while running) config.json."""
    for name in ("summary.json", "config.json"):
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            config = data.get("config", data)
            return {
                "task": data.get("task", config.get("data", {}).get("task", "?")),
                "method": data.get("method", config.get("privacy", {}).get("method", "?")),
                "importance": config.get("privacy", {}).get("importance", "?"),
                "finished": name == "summary.json",
            }
    return {"task": "?", "method": "?", "importance": "?", "finished": False}


def draw(workdir: str, out_dir: str | None = None, *, step: int | None = None, max_panels: int = 6,
         importance: bool = False) -> list[str]:
    """Draws one run's heatmaps; returns the paths written."""
    workdir = os.path.normpath(workdir)
    snapshots = [r for r in read_records(workdir) if "noise_scales" in r]
    if step is not None:
        snapshots = [r for r in snapshots if r["step"] <= step]
    if not snapshots:
        raise ValueError(f"{workdir}: no evaluation with noise scales"
                         + (f" at or before step {step}" if step is not None else "")
                         + " (only ANADP runs have them)")
    info = read_description(workdir)
    if out_dir is None:
        prefix = workdir + os.sep
    else:
        os.makedirs(out_dir, exist_ok=True)
        prefix = os.path.join(out_dir, os.path.basename(workdir) + "_")
    name = os.path.basename(workdir)
    last = snapshots[-1]
    title = f"{name}: noise scale s_k per group"
    paths = [prefix + "noise_scales.png", prefix + "noise_scales_over_time.png"]
    plots.plot_group_heatmap(last["noise_scales"], paths[0],
                             title=f"{name}\nnoise scale s_k per group (step {last['step']})", center=1.0)
    plots.plot_group_heatmap_over_time([(r["step"], r["noise_scales"]) for r in snapshots], paths[1],
                                       title=title, center=1.0, max_panels=max_panels)
    if importance and all("importance" in r for r in snapshots):
        paths.append(prefix + "importance_over_time.png")
        plots.plot_group_heatmap_over_time([(r["step"], r["importance"]) for r in snapshots], paths[-1],
                                           title=f"{name}: group importance S_k ({info['importance']})",
                                           max_panels=max_panels)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", action="append", required=True, help="a run's folder (repeatable)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: each run's own folder)")
    p.add_argument("--step", type=int, default=None, help="last step to draw (default: the last evaluation)")
    p.add_argument("--max_panels", type=int, default=6, help="evaluations shown over time")
    p.add_argument("--importance", action="store_true", help="also draw the importance S_k over time")
    args = p.parse_args(argv)
    status = 0
    for workdir in args.workdir:
        try:
            for path in draw(workdir, args.out, step=args.step, max_panels=args.max_panels,
                             importance=args.importance):
                print(path)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
