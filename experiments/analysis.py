"""Second looks at collected grids: where along training ANADP and DP-SGD part, and
whether uneven noise costs accuracy. Reads the cells that `grid.py collect` reads.

    python experiments/analysis.py --root=experiments/results/runs/rt_main \
        --grid=rt_profile_paired --out=experiments/results/rt_profile_paired

writes `<out>_by_step.md` and `<out>_by_step.png`:

- by step: every method's dev metric at each evaluation step (mean ± sd over
  seeds), and ANADP − DP-SGD paired on the seed at the same step. A gap that
  opens only in the last evaluations points at the end of training (noise under
  a constant learning rate), not at the allocation as such;
- allocation spread: over the ANADP runs with gamma != 0 that have a DP-SGD
  partner (same task, model, fine-tuning, budget, steps and seed), the Spearman
  correlation between the ratio max/min of the final per-group noise scales and
  the paired difference. `--seeds=0` keeps one seed per setting, so that no
  setting counts more than once.

The reported numbers remain the final step's: picking a step on the dev set
would select on the data the table is scored on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import collect  # noqa: E402  (the collector: rows, settings, budgets)
from experiments.cells import parse_seeds, path_for_commands, split_list  # noqa: E402
from experiments.figures import panel_axes  # noqa: E402
from experiments.formatting import method_rank, short_number  # noqa: E402


def eval_curve(workdir: str, metric: str) -> dict[int, float]:
    """{step: dev metric} from a run's metrics.jsonl (empty when it logged none)."""
    curve = {}
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                record = json.loads(line)
                value = record.get("eval", {}).get("validation", {}).get(metric)
                if value is not None:
                    curve[int(record["step"])] = float(value)
    except (OSError, ValueError):
        return {}
    return curve


def _setting_label(key: tuple) -> str:
    task, _, finetune, method, settings, budget, steps, lr = key
    target = f"ε={short_number(budget[1])}" if budget and budget[0] == "eps" else (
        f"σ={short_number(budget[1])}" if budget else "non-private")
    return (f"{task} / {finetune} / {target}: {method}" + (f" ({settings})" if settings else "")
            + (f", lr {short_number(lr)}" if lr else ""))


def by_step(rows: list[dict]) -> dict:
    """Per setting: the mean and sd over seeds at each evaluation step; for ANADP, the paired
    difference to DP-SGD at each step. Steps missing from a run are left out of that step's mean."""
    curves = {id(r): eval_curve(r["workdir"], r["main_metric"]) for r in rows}
    partners = {collect.pair_key(r): r for r in rows if r["method"] == "dp_sgd"}
    out: dict[tuple, dict] = {}
    members: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        members[collect.group_key(r)].append(r)
    for key, runs in members.items():
        steps = sorted({s for r in runs for s in curves[id(r)]})
        level = {s: collect.mean_sd([curves[id(r)][s] for r in runs if s in curves[id(r)]]) for s in steps}
        diff = {}
        if key[3] == "anadp":
            for s in steps:
                values = []
                for r in runs:
                    partner = partners.get(collect.pair_key(r))
                    if partner is not None and s in curves[id(r)] and s in curves[id(partner)]:
                        values.append(curves[id(r)][s] - curves[id(partner)][s])
                if values:
                    diff[s] = (*collect.mean_sd(values), len(values))
        out[key] = {"steps": steps, "level": level, "diff": diff, "n": len(runs)}
    return out


def _spearman(xs: list[float], ys: list[float]) -> tuple[float, float]:
    from scipy import stats

    result = stats.spearmanr(xs, ys)
    return float(result.statistic), float(result.pvalue)


def allocation_spread(rows: list[dict]) -> dict | None:
    """Spearman(max/min final noise scale, ANADP − DP-SGD) over the ANADP runs with gamma != 0 and a
    DP-SGD partner; None when they come from fewer than 3 settings."""
    partners = {collect.pair_key(r): r for r in rows if r["method"] == "dp_sgd"}
    points = []
    for r in rows:
        if r["method"] != "anadp" or not r["noise_scale_min"] or float(r["gamma"]) == 0:
            continue
        partner = partners.get(collect.pair_key(r))
        if partner is not None:
            ratio = float(r["noise_scale_max"]) / float(r["noise_scale_min"])
            points.append((ratio, float(r["main_metric_value"]) - float(partner["main_metric_value"]),
                           collect.settings_label(r), r["cell"]))
    if len({setting for _, _, setting, _ in points}) < 3:
        return None  # with one or two settings this compares settings, not spreads
    rho, p = _spearman([x for x, *_ in points], [y for _, y, *_ in points])
    return {"rho": rho, "p": p, "points": sorted((x, y, cell) for x, y, _, cell in points)}


def _fmt(mean: float, sd: float, sign: str = "") -> str:
    return f"{100 * mean:{sign}.2f}" + (f" ± {100 * sd:.2f}" if math.isfinite(sd) else "")


def markdown(curves: dict, spread: dict | None, command: str) -> str:
    lines = [f"Made by `{command}`.", "",
             "Dev metric (×100) at each evaluation step, mean ± sd over seeds; for ANADP, the difference to "
             "DP-SGD paired on the seed at the same step (mean ± sd over pairs, number of pairs).", ""]
    keys = sorted(curves, key=lambda k: (k[0], k[2], k[5], k[7], method_rank(k[3]), k[4]))
    steps = sorted({s for k in keys for s in curves[k]["steps"]})
    lines.append("| setting | seeds | " + " | ".join(f"step {s}" for s in steps) + " |")
    lines.append("|---|---|" + "---|" * len(steps))
    for k in keys:
        c = curves[k]
        cells = [_fmt(*c["level"][s]) if s in c["level"] else "–" for s in steps]
        lines.append(f"| {_setting_label(k)} | {c['n']} | " + " | ".join(cells) + " |")
        if c["diff"]:
            diffs = [f"{_fmt(*c['diff'][s][:2], sign='+')} ({c['diff'][s][2]})" if s in c["diff"] else "–"
                     for s in steps]
            lines.append("| ↳ ANADP − DP-SGD | | " + " | ".join(diffs) + " |")
    if spread is not None:
        lines += ["", f"Allocation spread: over {len(spread['points'])} ANADP runs with γ ≠ 0 and a DP-SGD "
                  f"partner, Spearman(max/min final noise scale, ANADP − DP-SGD) = {spread['rho']:.2f} "
                  f"(p = {spread['p']:.2g}).", "", "| max/min noise scale | ANADP − DP-SGD | run |", "|---|---|---|"]
        lines += [f"| {x:.2f} | {100 * y:+.2f} | {cell} |" for x, y, cell in spread["points"]]
    return "\n".join(lines) + "\n"


def plot(curves: dict, path: str) -> None:
    """Dev metric against step, one panel per (task, fine-tuning, budget), one line per method and setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[tuple]] = defaultdict(list)
    for k in curves:
        if k[3] != "non_private":
            panels[(k[0], k[2], k[5], k[6], k[7])].append(k)  # one panel per learning rate too
    keys = sorted(panels)
    if not keys:
        return
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    settings = sorted({(k[3], k[4]) for k in curves if k[3] not in ("non_private", "dp_sgd")})
    colors = {s: palette[i % len(palette)] for i, s in enumerate(settings)}  # one colour per setting everywhere
    crowded = max(len(v) for v in panels.values()) > 8  # a sweep: one panel per row, legend beside it
    fig, axes = panel_axes(plt, len(keys), 1 if crowded else min(3, len(keys)), (5.6, 4.0))
    for ax, panel in zip(axes.flat, keys):
        task, finetune, budget, steps, lr = panel
        for k in sorted(panels[panel], key=lambda k: (method_rank(k[3]), k[4])):
            c = curves[k]
            xs = [s for s in c["steps"] if s in c["level"]]
            means = [c["level"][s][0] for s in xs]
            sds = [c["level"][s][1] if math.isfinite(c["level"][s][1]) else 0.0 for s in xs]
            label = k[3] + (f" ({k[4]})" if k[4] else "") + f", n={c['n']}"
            style = ({"color": "black", "lw": 2.2, "zorder": 5} if k[3] == "dp_sgd"  # the reference
                     else {"color": colors[(k[3], k[4])]})
            line, = ax.plot(xs, means, marker="o", ms=3, label=label, **style)
            ax.fill_between(xs, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                            color=line.get_color(), alpha=0.15)
        target = f"ε={short_number(budget[1])}" if budget[0] == "eps" else f"σ={short_number(budget[1])}"
        ax.set_title(f"{task} / {finetune}, {target}" + (f", lr {short_number(lr)}" if lr else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("dev metric (mean ± sd over seeds)")
        ax.grid(alpha=0.3)
        if crowded:
            ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5), ncol=2, frameon=False)
        else:
            ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    if crowded:
        fig.subplots_adjust(hspace=0.45)  # tight_layout cannot fit legends beside the panels
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="analysis.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", action="append", required=True, help="grid root(s), comma-separated or repeated")
    p.add_argument("--grid", action="append", default=None, help="keep only these grids' settings")
    p.add_argument("--seeds", default=None, help="keep only these seeds (comma-separated)")
    p.add_argument("--out", required=True, help="output prefix: writes <out>_by_step.md and .png")
    args = p.parse_args(argv)
    roots = [os.path.abspath(r) for r in split_list(args.root)]
    missing = [r for r in roots if not os.path.isdir(r)]
    if missing:
        print(f"error: no such root: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = collect.load_rows(roots)
    grids = split_list(args.grid)
    if grids:
        try:
            wanted = collect.grid_settings(grids)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows = [r for r in rows if collect.setting_name(r["cell"]) in wanted]
    seeds = parse_seeds(args.seeds)
    if seeds is not None:
        rows = [r for r in rows if r["seed"] in seeds]
    if not rows:
        print("error: no finished runs match", file=sys.stderr)
        return 2
    curves = by_step(rows)
    spread = allocation_spread(rows)
    command = "python experiments/analysis.py " + " ".join(
        [f"--root={path_for_commands(r)}" for r in roots] + [f"--grid={g}" for g in grids]
        + ([f"--seeds={args.seeds}"] if seeds is not None else [])
        + [f"--out={path_for_commands(os.path.abspath(args.out))}"])
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + "_by_step.md", "w") as f:
        f.write(markdown(curves, spread, command))
    plot(curves, out + "_by_step.png")
    print(f"{len(rows)} runs: wrote {out}_by_step.md, {out}_by_step.png"
          + (f"; Spearman(noise-scale ratio, difference) = {spread['rho']:.2f} (p = {spread['p']:.2g}, "
             f"{len(spread['points'])} runs)" if spread else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
