"""The recipe search's summary figure: accuracy against epsilon, old recipe and new, with the floors and ceilings.

    python experiments/recipe_figure.py --roots=experiments/results/runs/rt_recipe,experiments/results/runs/rt_main \
        --out=experiments/results/rt_recipe_summary.png

One panel per task. Lines (mean ± sd over seeds, against target epsilon): the
old default recipe (LoRA, [CLS] pooler) and the new candidate (full fine-tuning,
mean pooling), both DP-SGD, and the private head-only baseline (a linear probe on
the frozen mean-pooled features, same accounting), the floor a private
fine-tuning recipe must clear. Every non-private setting found is drawn across
the panel (its mean dashed, mean ± sd shaded). Reads the cells' summaries as
experiments/grid.py collect does; n is in each legend entry.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import collect, figures  # noqa: E402

# (legend, fine-tuning mode, method, the cells' recipe label, learning rate or None for any)
PRIVATE_SERIES = (
    ("DP-SGD, old recipe: LoRA, [CLS] pooler", "lora", "dp_sgd", "", None),
    ("DP-SGD, full fine-tuning, mean pooling, lr 1e-3", "full", "dp_sgd", "pooling=mean", 1e-3),
    ("DP-SGD, head only (linear probe), mean pooling", "head", "dp_sgd", "pooling=mean", None),
)


def series_points(aggregates: list[dict], finetune: str, method: str, settings: str, lr) -> list[dict]:
    """The series' settings at the largest step count it ran (the full training run), by epsilon."""
    points = [a for a in aggregates if (a["finetune"], a["method"], a["settings"]) == (finetune, method, settings)
              and a["target_epsilon"] is not None and (lr is None or a["learning_rate"] == lr)]
    if not points:
        return []
    steps = max(p["steps"] for p in points)
    return sorted((p for p in points if p["steps"] == steps), key=lambda p: p["target_epsilon"])


MODE_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "bias": "bias only", "head": "head only"}


def non_private_label(a: dict) -> str:
    pooling = "mean pooling" if "pooling=mean" in a["settings"] else "[CLS] pooler"
    return f"non-private, {MODE_NAMES[a['finetune']]}, {pooling}"


def draw_task(plt, ax, task: str, aggregates: list[dict]) -> None:
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4)
    epsilons = set()
    for label, finetune, method, settings, lr in PRIVATE_SERIES:
        points = series_points(aggregates, finetune, method, settings, lr)
        color = next(colors)
        if not points:
            continue
        epsilons.update(p["target_epsilon"] for p in points)
        ns = sorted({p["n"] for p in points})
        ax.errorbar([p["target_epsilon"] for p in points], [p["mean"] for p in points],
                    yerr=[figures.sd_or_zero(p) for p in points], marker="o", ms=4, capsize=3, color=color,
                    label=f"{label} (n={'/'.join(map(str, ns))})")
    for a in sorted((a for a in aggregates if a["method"] == "non_private"), key=non_private_label):
        figures.reference_band(ax, a, next(colors), non_private_label(a))
    figures.epsilon_axis(ax, sorted(epsilons))
    ax.set_xlabel("target ε (δ = 1e-5)")
    ax.set_ylabel("dev accuracy (final step)")
    ax.set_title(f"{task}, MiniLM-L6", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def plot(aggregates: list[dict], path: str) -> None:
    by_task = defaultdict(list)
    for a in aggregates:
        by_task[a["task"]].append(a)
    plt = figures.pyplot()
    fig, axes = figures.panel_axes(plt, len(by_task), len(by_task), (6.4, 4.6))
    for ax, task in zip(axes.flat, sorted(by_task)):
        draw_task(plt, ax, task, by_task[task])
    figures.save(plt, fig, path)


def main(argv=None) -> int:
    # argparse, not absl flags: tests import this module beside benchmark.py, whose
    # absl flags (--out among them) would then be defined twice.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", required=True, help="comma-separated grid roots whose cells to read")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    roots = [r for r in args.roots.split(",") if r]
    rows = collect.load_rows(roots)
    if not rows:
        parser.error(f"--roots={args.roots}: no finished cells there")
    plot(collect.aggregate(rows), args.out)
    print(f"wrote {args.out} from {len(rows)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
