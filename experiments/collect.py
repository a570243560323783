"""Collects finished grid cells (their summary.json) into tables and figures.

    collect(roots, out, grids)

writes `<out>.csv` (one row per finished cell), `<out>.md` (mean ± sd over
seeds per setting, the paired difference ANADP − DP-SGD at the same task,
model, fine-tuning, budget, steps, learning rate, recipe and seed, and ANADP's
final noise scales and importance/|theta| correlation),
`<out>_accuracy_vs_epsilon.png` and, when ANADP ran at several gammas,
`<out>_sweep.png`. With `grids`, only the settings those grids define count
(grids that share a root are told apart this way).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections import defaultdict

from experiments import figures
from experiments.cells import REPO, path_for_commands, plan
from experiments.formatting import markdown_table, method_rank, plus_minus, short_number
from experiments.grids import GRIDS

CSV_COLUMNS = [
    "cell", "task", "model", "finetune", "method", "clipping", "importance", "gamma", "rho", "learning_rate",
    "target_epsilon", "epsilon", "dp_sgd_epsilon_same_sigma", "noise_multiplier", "seed",
    "main_metric", "main_metric_value", "importance_weight_corr", "noise_scale_min", "noise_scale_max",
    "steps", "wall_time_s", "command", "workdir",
]

# --- one row per finished run ----------------------------------------------------


def _command_log(root: str) -> dict[str, str]:
    """The last successful command of each cell in <root>/commands.txt."""
    out = {}
    try:
        with open(os.path.join(root, "commands.txt")) as f:
            for line in f:
                fields = line.rstrip("\n").split("\t")
                if len(fields) >= 5 and fields[2] == "rc=0":
                    out[fields[1]] = fields[4]
    except OSError:
        pass
    return out


def _cell_command(workdir: str, logged: str) -> str:
    """The cell's command.txt, else its line in commands.txt (runs made before command.txt existed)."""
    try:
        with open(os.path.join(workdir, "command.txt")) as f:
            return f.read().strip() or logged
    except OSError:
        return logged


NO_ALLOCATION = {"importance_weight_corr": None, "noise_scale_min": None, "noise_scale_max": None}


def last_allocation(workdir: str) -> dict:
    """ANADP's allocation at the last logged step of a run: the rank correlation of its
    importance with the groups' mean |theta| and the range of its per-group noise scales
    (NO_ALLOCATION when the run logged none)."""
    last = {}
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                record = json.loads(line)
                if "noise_scales" in record:
                    last = record
    except (OSError, ValueError):
        return dict(NO_ALLOCATION)  # a copy: callers may fill it in
    scales = list(last.get("noise_scales", {}).values())
    return {
        "importance_weight_corr": last.get("importance_weight_corr"),
        "noise_scale_min": min(scales) if scales else None,
        "noise_scale_max": max(scales) if scales else None,
    }


def setting_name(cell: str) -> str:
    """A cell's name without its seed: the setting it is one seed of."""
    head, sep, tail = cell.rpartition("-seed")
    return head if sep and tail.isdigit() else cell


def grid_settings(grids: list[str]) -> set[str]:
    """The settings (cell names without seed) of the named grids, as defined in GRIDS."""
    unknown = [g for g in grids if g not in GRIDS]
    if unknown:
        raise ValueError(f"unknown grid {', '.join(unknown)}; grids: {', '.join(GRIDS)}")
    return {setting_name(cell.name) for g in grids for cell in plan(g, os.path.join(REPO, "unused"), seeds=(0,))}


def run_row(workdir: str, summary: dict, command: str) -> dict:
    """The CSV row of one finished run (plus its recipe label, which the CSV leaves out)."""
    config = summary.get("config", {})
    priv = config.get("privacy", {})
    anadp = summary["method"] == "anadp"
    metric = summary.get("main_metric", "accuracy")
    return {
        "cell": os.path.basename(os.path.normpath(workdir)),
        "task": summary["task"],
        "model": summary.get("model", ""),
        "finetune": summary["finetune"],
        "method": summary["method"],
        "clipping": summary.get("clipping") or "",
        "importance": priv.get("importance", "") if anadp else "",
        "gamma": priv.get("gamma", "") if anadp else "",
        "rho": priv.get("rho", "") if anadp else "",
        "learning_rate": config.get("train", {}).get("learning_rate"),
        "recipe": recipe_label(config, summary.get("pooling")),
        # a missing target (non-private) may be stored as "" or None
        "target_epsilon": None if summary.get("target_epsilon") in (None, "") else summary["target_epsilon"],
        "epsilon": summary.get("epsilon"),
        "dp_sgd_epsilon_same_sigma": summary.get("dp_sgd_epsilon_same_sigma"),
        "noise_multiplier": summary.get("noise_multiplier"),
        "seed": summary.get("seed"),
        "main_metric": metric,
        "main_metric_value": summary["eval"][metric],
        **(last_allocation(workdir) if anadp else NO_ALLOCATION),
        "steps": summary.get("steps"),
        "wall_time_s": summary.get("nonprivate/wall_time_s", summary.get("wall_time_s")),
        "command": command,
        "workdir": path_for_commands(workdir),
    }


def _run_dirs(root: str) -> list[str]:
    """The folders under `root` that hold a summary.json, in a stable order (checkpoints not searched)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "checkpoints")
        if "summary.json" in filenames:
            found.append(dirpath)
    return found


def load_rows(roots: list[str]) -> list[dict]:
    """One row per summary.json under the roots (the first copy of a cell seen twice wins)."""
    rows, seen = [], {}
    for root in roots:
        commands = _command_log(root)
        for workdir in _run_dirs(root):
            with open(os.path.join(workdir, "summary.json")) as f:
                summary = json.load(f)
            logged = commands.get(os.path.basename(os.path.normpath(workdir)), "")
            row = run_row(workdir, summary, _cell_command(workdir, logged))
            key = (*group_key(row), row["seed"])
            if key in seen:
                print(f"warning: {workdir} repeats {seen[key]} (same setting and seed); keeping the first",
                      file=sys.stderr)
                continue
            seen[key] = workdir
            rows.append(row)
    return rows


# --- settings, pairs and their statistics ---------------------------------------------


def budget(row: dict) -> tuple:
    """What a private run was calibrated to: ("eps", target) or ("sigma", multiplier); () if non-private."""
    if row["method"] == "non_private":
        return ()
    if row["target_epsilon"] is not None:
        return ("eps", float(row["target_epsilon"]))
    return ("sigma", float(row["noise_multiplier"]))


# Training-recipe fields and the values every run had before they became options (issue #20):
# a run that differs in one of them is another setting, and its label says how.
RECIPE_DEFAULTS = {
    "model.pooling": "cls", "model.head_init": "normal", "model.lora_rank": 8, "model.lora_targets": "query,value",
    "privacy.l2_norm_clip": 1.0, "privacy.clip_fn": "clip", "train.schedule": "constant",
    "train.lr_warmup_steps": 0, "train.optimizer": "adam", "train.weight_decay": 0.0, "train.dtype": "float32",
}


def recipe_label(config: dict, pooling: str | None = None) -> str:
    """The recipe fields of a run's config that differ from RECIPE_DEFAULTS, e.g. "pooling=mean".

    `pooling`: the pooling the run's summary says its model used, which replaces the
    config's (where that is "auto", resolved against the checkpoint)."""
    changed = []
    for dotted, default in RECIPE_DEFAULTS.items():
        group, field = dotted.split(".")
        value = config.get(group, {}).get(field, default)
        if dotted == "model.pooling" and pooling:
            value = pooling
        if value != default:
            changed.append(f"{field}={short_number(value) if isinstance(value, float) else value}")
    return ", ".join(changed)


def settings_label(row: dict) -> str:
    """ANADP's settings and the recipe's changes, as the tables' "ANADP settings" column shows them."""
    recipe = row.get("recipe", "")
    if row["method"] != "anadp":
        return recipe
    label = (f"{row['clipping']}, {row['importance']}, γ={short_number(float(row['gamma']))}, "
             f"ρ={short_number(float(row['rho']))}")
    return f"{label}, {recipe}" if recipe else label


def group_key(row: dict) -> tuple:
    """What makes runs seeds of one setting; runs that differ only in learning rate are different settings
    (a run that recorded none counts as 0, so keys stay sortable)."""
    return (row["task"], row["model"], row["finetune"], row["method"], settings_label(row), budget(row),
            row["steps"], row["learning_rate"] or 0.0)


def pair_key(row: dict) -> tuple:
    """What an ANADP run is compared on with its DP-SGD partner: everything but the method, the seed included."""
    return (row["task"], row["model"], row["finetune"], budget(row), row["steps"], row["learning_rate"],
            row.get("recipe", ""), row["seed"])


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample sd (nan for an empty list, sd nan for a single value)."""
    n = len(values)
    mean = sum(values) / n if n else math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd


def _mean_or_none(values: list[float]) -> float | None:
    return mean_sd(values)[0] if values else None


def _allocation_summary(members: list[dict]) -> dict:
    """Over a setting's seeds: mean final importance/|theta| correlation, full range of final noise scales."""
    def present(key):
        return [float(r[key]) for r in members if r.get(key) is not None]

    lows, highs = present("noise_scale_min"), present("noise_scale_max")
    return {
        "importance_weight_corr_mean": _mean_or_none(present("importance_weight_corr")),
        "noise_scale_min": min(lows) if lows else None,
        "noise_scale_max": max(highs) if highs else None,
    }


def _paired_difference(members: list[dict], dp_sgd: dict[tuple, dict]) -> dict:
    """ANADP − DP-SGD over the members that have a DP-SGD partner (pair_key): mean, sd, pairs."""
    diffs = [float(r["main_metric_value"]) - float(dp_sgd[pair_key(r)]["main_metric_value"])
             for r in members if pair_key(r) in dp_sgd]
    if not diffs:
        return {"diff_mean": None, "diff_sd": None, "n_pairs": 0}
    diff_mean, diff_sd = mean_sd(diffs)
    return {"diff_mean": diff_mean, "diff_sd": diff_sd, "n_pairs": len(diffs)}


def _aggregate_setting(key: tuple, members: list[dict], dp_sgd: dict[tuple, dict]) -> dict:
    """One setting's statistics over its seeds (members sorted by seed)."""
    task, model, finetune, method, label, bud, steps, lr = key
    mean, sd = mean_sd([float(r["main_metric_value"]) for r in members])
    same_sigma = [float(r["dp_sgd_epsilon_same_sigma"]) for r in members
                  if r["dp_sgd_epsilon_same_sigma"] is not None]
    first = members[0]
    return {
        "task": task, "model": model, "finetune": finetune, "method": method, "settings": label,
        "clipping": first["clipping"], "importance": first["importance"],
        "gamma": first["gamma"], "rho": first["rho"],
        "budget": bud, "target_epsilon": bud[1] if bud and bud[0] == "eps" else None,
        "noise_multiplier": bud[1] if bud and bud[0] == "sigma" else None,
        "steps": steps, "learning_rate": lr, "main_metric": first["main_metric"],
        "seeds": [r["seed"] for r in members], "n": len(members), "mean": mean, "sd": sd,
        "epsilon_mean": mean_sd([float(r["epsilon"]) for r in members])[0],
        "dp_sgd_epsilon_same_sigma_mean": _mean_or_none(same_sigma),
        **_allocation_summary(members),
        **(_paired_difference(members, dp_sgd) if method == "anadp"
           else {"diff_mean": None, "diff_sd": None, "n_pairs": 0}),
    }


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and sample sd over seeds per setting, and ANADP - DP-SGD paired on the seed."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[group_key(row)].append(row)
    dp_sgd = {pair_key(row): row for row in rows if row["method"] == "dp_sgd"}
    out = [_aggregate_setting(key, sorted(members, key=lambda r: r["seed"]), dp_sgd)
           for key, members in groups.items()]
    out.sort(key=lambda a: (a["task"], a["model"], a["finetune"], a["steps"], method_rank(a["method"]),
                            a["budget"], a["settings"], a["learning_rate"]))
    return out


# --- the files --------------------------------------------------------------------------


def write_csv(rows: list[dict], path: str) -> None:
    rows = sorted(rows, key=lambda r: (r["task"], r["finetune"], method_rank(r["method"]),
                                       settings_label(r), budget(r), r["seed"]))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_COLUMNS})


TABLE_INTRO = (
    "Dev-set main metric (×100), mean ± sample sd over seeds; ANADP − DP-SGD is the paired difference "
    "at the same task, model, fine-tuning, target epsilon, steps, learning rate and seed (×100, mean ± sd over "
    "pairs). "
    "Target ε is what the noise multiplier was calibrated to; reported ε is what the run's ledger spent "
    "(for privacy.clipping=global, above the target; DP-SGD's claim at that sigma is in parentheses). "
    "ANADP's allocation at its last logged step: the range of its per-group noise scales over all seeds, "
    "and the Spearman correlation of its importance with the groups' mean |θ| (mean over seeds)."
)


def _epsilon_columns(a: dict) -> list[str]:
    """Target and reported epsilon of a setting (∞ for non-private; DP-SGD's claim at the same sigma in ())."""
    if a["method"] == "non_private":
        return ["∞", "∞"]
    target = (short_number(a["target_epsilon"]) if a["target_epsilon"] is not None
              else f"σ={short_number(a['noise_multiplier'])}")
    reported = f"{a['epsilon_mean']:.3g}"
    if a["dp_sgd_epsilon_same_sigma_mean"] is not None:
        reported += f" ({a['dp_sgd_epsilon_same_sigma_mean']:.3g})"
    return [target, reported]


def _table_row(a: dict, show_model: bool) -> list[str]:
    noise_scales = (f"{a['noise_scale_min']:.2f}–{a['noise_scale_max']:.2f}" if a["noise_scale_min"] is not None
                    else "–")
    corr = a["importance_weight_corr_mean"]
    return [a["task"]] + ([a["model"]] if show_model else []) + [
        a["finetune"], str(a["steps"]), short_number(a["learning_rate"]) if a["learning_rate"] else "–",
        a["method"], a["settings"] or "–", *_epsilon_columns(a), a["main_metric"],
        plus_minus(a["mean"], a["sd"]), str(a["n"]),
        plus_minus(a["diff_mean"], a["diff_sd"]) if a["n_pairs"] else "–",
        str(a["n_pairs"]) if a["method"] == "anadp" else "–",
        noise_scales, f"{corr:.2f}" if corr is not None else "–",
    ]


def markdown(aggregates: list[dict], roots: list[str], num_rows: int, figure_links: list[tuple[str, str]]) -> str:
    """The collected table; `figure_links` are (alt text, file name) pairs linked below it."""
    # The model column only where the runs used more than one model.
    show_model = len({a["model"] for a in aggregates}) > 1
    header = ["task"] + (["model"] if show_model else []) + [
        "finetune", "steps", "lr", "method", "ANADP settings", "target ε", "reported ε", "metric", "mean ± sd", "n",
        "ANADP − DP-SGD", "pairs", "final noise scales", r"corr(importance, \|θ\|)"]
    lines = [TABLE_INTRO, "", f"{num_rows} runs from: " + ", ".join(f"`{path_for_commands(r)}`" for r in roots), ""]
    lines += markdown_table(header, [_table_row(a, show_model) for a in aggregates])
    for alt, name in figure_links:
        lines += ["", f"![{alt}]({name})"]
    return "\n".join(lines) + "\n"


def collect(roots: list[str], out: str, grids: list[str] | None = None) -> list[dict]:
    """Writes <out>.csv, <out>.md, <out>_accuracy_vs_epsilon.png and, when the runs hold a gamma
    sweep, <out>_sweep.png; returns the aggregates. With `grids`, only those grids' settings count."""
    roots = [os.path.abspath(r) for r in roots]
    missing = [r for r in roots if not os.path.isdir(r)]
    if missing:
        raise ValueError(f"no such root: {', '.join(missing)}")
    rows = load_rows(roots)
    if grids:
        wanted = grid_settings(grids)
        rows = [r for r in rows if setting_name(r["cell"]) in wanted]
    if not rows:
        raise ValueError(f"no summary.json under {', '.join(roots)}" + (f" from grid {', '.join(grids)}"
                                                                        if grids else ""))
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    aggregates = aggregate(rows)
    write_csv(rows, out + ".csv")
    figure = out + "_accuracy_vs_epsilon.png"
    figures.plot_accuracy_vs_epsilon(aggregates, figure)
    sweep = out + "_sweep.png"
    has_sweep = figures.plot_sweep(aggregates, sweep)
    linked = [("accuracy vs epsilon", os.path.basename(figure))]
    if has_sweep:
        linked.append(("ANADP sweep against gamma", os.path.basename(sweep)))
    with open(out + ".md", "w") as f:
        f.write(markdown(aggregates, roots, len(rows), linked))
    print(f"{len(rows)} runs, {len(aggregates)} settings: wrote {out}.csv, {out}.md, {figure}"
          + (f", {sweep}" if has_sweep else ""))
    return aggregates
