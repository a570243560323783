"""The collector's figures: metric against target epsilon, and ANADP's gamma sweeps.

Both read the aggregates of experiments/collect.py (one dict per setting: mean,
sd and n over seeds) and draw with matplotlib's Agg backend, imported only here
and only when a figure is drawn.
"""

from __future__ import annotations

import math
from collections import defaultdict

from experiments.formatting import method_rank, short_number


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sd_or_zero(a: dict) -> float:
    """A setting's sd for error bars (0 for a single seed)."""
    return a["sd"] if math.isfinite(a["sd"]) else 0.0


def reference_band(ax, a: dict, color, label: str) -> None:
    """A reference setting drawn across the panel: its mean as a dashed line, mean ± sd as a band."""
    sd = sd_or_zero(a)
    ax.axhspan(a["mean"] - sd, a["mean"] + sd, color=color, alpha=0.2)
    ax.axhline(a["mean"], color=color, ls="--", lw=1.2, label=f"{label} (n={a['n']})")


def panel_axes(plt, count: int, columns: int, size: tuple[float, float]):
    """A figure of `count` panels in rows of `columns` (each `size` inches); unused cells blanked."""
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size[0] * columns, size[1] * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, axes


def save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _series_name(method: str, label: str, lr, lrs: set) -> str:
    """A legend entry; the learning rate is named only where the method ran at more than one."""
    name = method + (f" ({label})" if label else "")
    if len(lrs) > 1:
        name += f", lr {short_number(lr)}"
    if label.startswith("global"):
        name += ": spends more than its target ε"
    return name


def epsilon_axis(ax, epsilons: list[float]) -> None:
    ax.set_xscale("log")
    if epsilons:
        ax.set_xticks(epsilons, [short_number(e) for e in epsilons])
        ax.minorticks_off()
        ax.set_xlim(min(epsilons) / 1.5, max(epsilons) * 1.5)


def _epsilon_panel(plt, ax, key: tuple, settings: list[dict]) -> None:
    """One panel: each private series against target epsilon, non-private as a band."""
    task, model, finetune, steps = key
    series: dict[tuple, list[dict]] = defaultdict(list)
    for a in settings:
        series[(a["method"], a["settings"], a["learning_rate"])].append(a)
    lrs_of = defaultdict(set)
    for method, label, lr in series:
        lrs_of[(method, label)].add(lr)
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10)
    ordered = sorted(series.items(), key=lambda kv: (method_rank(kv[0][0]), kv[0][1], kv[0][2]))
    num_private = sum(method != "non_private" for method, _, _ in series)
    offset = 0
    for (method, label, lr), points in ordered:
        color = next(colors)
        if method == "non_private":
            reference_band(ax, points[0], color, "non-private")
            continue
        points = sorted((p for p in points if p["target_epsilon"] is not None), key=lambda p: p["target_epsilon"])
        if not points:
            continue
        # Series side by side around each epsilon (a small multiplicative shift), error bars visible.
        shift = 1.0 + min(0.025, 0.4 / max(num_private, 1)) * (offset - (num_private - 1) / 2)
        offset += 1
        ax.errorbar([p["target_epsilon"] * shift for p in points], [p["mean"] for p in points],
                    yerr=[sd_or_zero(p) for p in points], marker="o", ms=4, capsize=3, color=color,
                    label=_series_name(method, label, lr, lrs_of[(method, label)]))
    epsilon_axis(ax, sorted({a["target_epsilon"] for a in settings if a["target_epsilon"] is not None}))
    ax.set_xlabel("target ε")
    ax.set_ylabel(f"dev {settings[0]['main_metric']}")
    ax.set_title(f"{task} / {finetune}\n{model}, {steps} steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(series) <= 6 else 5, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              ncol=1 if len(series) <= 8 else 2, frameon=False)


def plot_accuracy_vs_epsilon(aggregates: list[dict], path: str) -> None:
    """Per (task, model, finetune, steps): metric vs target epsilon, one line per method; non-private a band."""
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for a in aggregates:
        panels[(a["task"], a["model"], a["finetune"], a["steps"])].append(a)
    keys = sorted(panels)
    if not keys:
        return
    plt = pyplot()
    fig, axes = panel_axes(plt, len(keys), min(3, len(keys)), (6.2, 4.2))
    for ax, key in zip(axes.flat, keys):
        _epsilon_panel(plt, ax, key, panels[key])
    save(plt, fig, path)


def _budget_key(a: dict) -> tuple:
    return (a["task"], a["model"], a["finetune"], a["budget"], a["steps"], a["learning_rate"])


def _sweeps(aggregates: list[dict]) -> dict[tuple, list[dict]]:
    """ANADP settings that differ in gamma at one (task, model, finetune, budget, steps, lr): the sweeps to plot."""
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for a in aggregates:
        if a["method"] == "anadp" and a["budget"]:
            panels[_budget_key(a)].append(a)
    return {k: v for k, v in panels.items() if len({float(a["gamma"]) for a in v}) > 1}


def _sweep_panel(ax, key: tuple, sweep: list[dict], baseline: dict | None) -> None:
    """One budget: metric against gamma per (clipping, importance, rho), DP-SGD as a band."""
    task, model, finetune, budget, steps, _ = key
    if baseline is not None:
        reference_band(ax, baseline, "0.4", "DP-SGD")
    lines: dict[tuple, list[dict]] = defaultdict(list)
    for a in sweep:
        lines[(a["clipping"], a["importance"], float(a["rho"]))].append(a)
    for (clipping, importance, rho), points in sorted(lines.items()):
        points = sorted(points, key=lambda a: float(a["gamma"]))
        ns = sorted({a["n"] for a in points})
        label = f"{importance}, ρ={short_number(rho)}" + ("" if clipping == "elliptical" else f", {clipping}")
        ax.errorbar([float(a["gamma"]) for a in points], [a["mean"] for a in points],
                    yerr=[sd_or_zero(a) for a in points],
                    marker="o", ms=4, capsize=3, label=f"{label} (n={'/'.join(map(str, ns))})")
    budget_text = f"ε={short_number(budget[1])}" if budget[0] == "eps" else f"σ={short_number(budget[1])}"
    ax.set_xlabel("γ (> 0: less noise on important groups, the paper's direction; < 0: more)")
    ax.set_ylabel(f"dev {sweep[0]['main_metric']}")
    ax.set_title(f"ANADP sweep, {task} / {finetune}, {budget_text}\n{model}, {steps} steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)


def plot_sweep(aggregates: list[dict], path: str) -> bool:
    """Metric against gamma, one line per (clipping, importance, rho), DP-SGD at the same budget as a
    band (mean ± sd over its seeds); one panel per budget. Returns False (and draws nothing) without a sweep."""
    sweeps = _sweeps(aggregates)
    if not sweeps:
        return False
    plt = pyplot()
    baselines = {_budget_key(a): a for a in aggregates if a["method"] == "dp_sgd"}
    keys = sorted(sweeps)
    fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), 4.4), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _sweep_panel(ax, key, sweeps[key], baselines.get(key))
    save(plt, fig, path)
    return True
