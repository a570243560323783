"""The membership audit's outputs (experiments/membership_audit.py): membership_audit.md and .csv."""

from __future__ import annotations

import csv
import math
import os
import subprocess

from experiments.formatting import markdown_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """HEAD of the checkout that ran the audit, marked when tracked files had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" (with uncommitted changes)" if dirty else "")


def _num(x, fmt: str = ".3g") -> str:
    """A table entry: n/a for a missing or nan value, inf, integers as they are, other numbers in `fmt`."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, int):
        return str(x)
    return format(x, fmt)


def _table_row(r: dict) -> list[str]:
    verdict = {True: "**above**", False: "below", None: "-"}[r["bound_exceeds_claim"]]
    return [
        f"`{r['row']}`", r["method"], r["clipping"] or "-", _num(r["target_epsilon"], "g"),
        _num(r["reported_epsilon"]), _num(r["dp_sgd_epsilon_same_sigma"]),
        _num(r["epsilon_realised_sequence_not_a_guarantee"]), _num(r["canary_epsilon"]),
        _num(r["bound_delta"], ".1e"), str(r["num_canaries"]), str(r["num_included"]), _num(r["guesses"]),
        _num(r["correct"]), f"**{_num(r['epsilon_lower_bound'], '.3f')}**", verdict,
        _num(r["auc"], ".3f"), _num(r["tpr_at_1pct_fpr"], ".3f"), _num(r["dev_accuracy"], ".4f"),
    ]


def markdown(results: list[dict], commands: dict[str, str], header: dict) -> str:
    """The table, with the audit's settings above it and every row's training command below."""
    repeats = header["canary_repeats"]
    lines = [
        "# End-to-end membership audit (one training run per row)",
        "",
        f"Command: `{header['command']}`  ",
        f"Git commit: `{header['commit']}`  ",
        f"Canaries: m = {header['num_canaries']} ({header['num_included']} included, each "
        f"{repeats} time(s)), {header['canary_length']} words from the dev split, random labels; "
        f"canary seed {header['canary_seed']}, inclusion seed {header['inclusion_seed']}  ",
        f"Training rows: {header['train_rows']} ({header['task_train_rows']} of the task's train split); "
        f"privacy randomness: {header['randomness']}  ",
        f"Score: -loss of the canary's label. Guess counts k tried: {header['ks']} "
        f"(Bonferroni over them), confidence {header['confidence']}. The bound uses the delta of the claim "
        "it is compared with (non-private: the default delta for the training rows).",
    ]
    if repeats > 1:
        lines.append(f"Each canary is {repeats} rows: its claim is group privacy, "
                     f"(R eps, R e^((R-1) eps) delta) with R = {repeats} (an upper bound, not the accountant's).")
    header_cells = ["row", "method", "clipping", "target ε", "reported ε", "DP-SGD ε at its σ",
                    "realised ε (not a guarantee)", f"ε for a canary (R = {repeats})", "δ of the bound", "m",
                    "included", "k", "correct", "**ε ≥ (95%)**", "bound vs claim", "AUC", "TPR @ 1% FPR", "dev acc"]
    lines += [""] + markdown_table(header_cells, [_table_row(r) for r in results])
    lines += ["", "Training commands (run in the repository root):", ""]
    lines += [f"- `{r['row']}`: `{commands[r['row']]}`" for r in results]
    return "\n".join(lines) + "\n"


def write_tables(out: str, results: list[dict], commands: dict[str, str], header: dict) -> None:
    """membership_audit.md and membership_audit.csv (one line per row, its command and the commit) in `out`."""
    with open(os.path.join(out, "membership_audit.md"), "w", encoding="utf-8") as f:
        f.write(markdown(results, commands, header))
    fields = list(results[0]) + ["command", "commit"] if results else ["row"]
    with open(os.path.join(out, "membership_audit.csv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for r in results:
            writer.writerow({**r, "command": commands[r["row"]], "commit": header["commit"]})
