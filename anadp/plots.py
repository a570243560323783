"""Figures written into a run's workdir: training curves and noise-scale heatmaps."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from anadp.models import layer_and_matrix  # noqa: E402


def plot_run(workdir: str, records: list[dict], summary: dict) -> None:
    """Writes every figure that the run's records support."""
    evals = [r for r in records if "eval" in r]
    if evals:
        plot_training_curves(evals, summary, os.path.join(workdir, "training_curves.png"))
    allocated = [r for r in evals if "noise_scales" in r]
    if allocated:
        title = f"{summary['task']}: noise scale s_k per group"
        plot_group_heatmap(allocated[-1]["noise_scales"], os.path.join(workdir, "noise_scales.png"),
                           title=f"{title} (step {allocated[-1]['step']})", center=1.0)
        plot_group_heatmap_over_time(
            [(r["step"], r["noise_scales"]) for r in allocated],
            os.path.join(workdir, "noise_scales_over_time.png"), title=title, center=1.0,
        )
        plot_group_heatmap_over_time(
            [(r["step"], r["importance"]) for r in allocated],
            os.path.join(workdir, "importance_over_time.png"),
            title=f"{summary['task']}: group importance S_k ({summary['config']['privacy']['importance']})",
        )


def plot_training_curves(evals: list[dict], summary: dict, path: str) -> None:
    steps = [r["step"] for r in evals]
    split = next(iter(evals[0]["eval"]))
    metric = summary.get("main_metric", "accuracy")
    panels = [("dev " + metric, [r["eval"][split][metric] for r in evals]),
              ("dev loss", [r["eval"][split]["loss"] for r in evals])]
    if any("epsilon" in r for r in evals):
        panels.append(("epsilon spent", [r.get("epsilon", np.nan) for r in evals]))
    if any("importance_weight_corr" in r for r in evals):
        panels.append(("rank corr(S_k, mean|theta_k|)", [r.get("importance_weight_corr", np.nan) for r in evals]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (label, values) in zip(np.atleast_1d(axes), panels):
        ax.plot(steps, values, marker="o", ms=3)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{summary['task']} / {summary['method']} / {summary['finetune']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layer_matrix_grid(values: dict[str, float]) -> tuple[np.ndarray, list[str], list[str]]:
    """Arranges per-group values as (weight matrix x transformer layer).

    Groups outside the transformer layers (embeddings, pooler, classifier) get
    their own rows and a last column of their own, labelled "outside", so that
    none of them reads as belonging to layer 0.
    """
    cells: dict[tuple[str, int], float] = {}
    outside: dict[str, float] = {}
    for name, value in values.items():
        layer, matrix = layer_and_matrix(name)
        if layer is None:
            outside[matrix] = value
        else:
            cells[(matrix or "layer", layer)] = value
    num_layers = 1 + max((layer for _, layer in cells), default=-1)
    rows = sorted({m for m, _ in cells}) + sorted(outside)
    cols = [str(i) for i in range(num_layers)] + (["outside"] if outside else [])
    grid = np.full((len(rows), max(len(cols), 1)), np.nan)
    for (matrix, layer), value in cells.items():
        grid[rows.index(matrix), layer] = value
    for name, value in outside.items():
        grid[rows.index(name), -1] = value
    return grid, rows, cols


def _log_spread(values: np.ndarray, center: float) -> float:
    """Largest |log(v / center)| over the positive values (a symmetric log colour range)."""
    positive = np.where(values > 0, values, np.nan)
    spread = np.nanmax(np.abs(np.log(positive / center))) if np.isfinite(positive).any() else 0.1
    return spread if np.isfinite(spread) and spread > 0 else 0.1


def _draw(ax, grid, rows, cols, center: float | None, vmin=None, vmax=None, annotate=True, spread=None):
    if center is not None:
        spread = _log_spread(grid, center) if spread is None else spread
        from matplotlib.colors import LogNorm

        image = ax.imshow(grid, cmap="coolwarm", aspect="auto",
                          norm=LogNorm(vmin=center * np.exp(-spread), vmax=center * np.exp(spread)))
    else:
        image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_xlabel("transformer layer", fontsize=8)
    if annotate and grid.size <= 120:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6)
    return image


def plot_group_heatmap(values: dict[str, float], path: str, title: str, center: float | None = None) -> None:
    grid, rows, cols = layer_matrix_grid(values)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(cols) + 2.2, 0.9 + 0.32 * len(rows)))
    image = _draw(ax, grid, rows, cols, center)
    fig.colorbar(image, ax=ax)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_group_heatmap_over_time(
    snapshots: list[tuple[int, dict[str, float]]], path: str, title: str, center: float | None = None,
    max_panels: int = 6,
) -> None:
    """Small multiples of the heatmap at up to `max_panels` evenly spaced evaluations."""
    picks = np.unique(np.linspace(0, len(snapshots) - 1, min(max_panels, len(snapshots))).round().astype(int))
    grids = [layer_matrix_grid(snapshots[i][1]) for i in picks]
    finite = np.concatenate([g[np.isfinite(g)] for g, _, _ in grids]) if grids else np.array([1.0])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    rows = grids[0][1]
    fig, axes = plt.subplots(1, len(picks), figsize=(2.0 + 2.6 * len(picks), 1.0 + 0.3 * len(rows)), squeeze=False)
    for ax, i, (grid, r, c) in zip(axes[0], picks, grids):
        if center is not None:  # one colour scale for every panel, so they compare
            image = _draw(ax, grid, r, c, center, annotate=False, spread=_log_spread(finite, center))
        else:
            image = _draw(ax, grid, r, c, None, vmin=vmin, vmax=vmax, annotate=False)
        ax.set_title(f"step {snapshots[i][0]}", fontsize=8)
        if ax is not axes[0][0]:
            ax.set_yticks([])
    fig.colorbar(image, ax=list(axes[0]))
    fig.suptitle(title, fontsize=9, y=1.04)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
