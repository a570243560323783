"""Grids of fine-tuning runs (issue #6): run them cell by cell, then collect the results.

Run a grid. Every cell is its own `python launch.py` subprocess (a crash in
one cell does not stop the grid; the exact command is recorded), into
`<root>/<cell name>`; a cell whose summary.json exists is skipped, so a grid
cut short resumes where it stopped (a cell killed mid-run resumes from its
last checkpoint):

    python experiments/grid.py list                          # the grids and their cells
    python experiments/grid.py rt_main --dry_run             # print the commands only
    python experiments/grid.py rt_main                       # root: experiments/results/runs/rt_main
    python experiments/grid.py rt_sweep --seeds=0 --only=group_taylor --set=train.epochs=1
    python experiments/grid.py sst2_main --parallel=2 --root=/scratch/sst2

  --set=a.b=v   overrides config field a.b in every cell (repeatable); fields
                that are part of a cell's name (method, epsilon, gamma, ...)
                change the name with them. Other --set fields are not in the
                name: use a separate --root for a grid run with other settings
                (a cell whose finished summary disagrees with its command is
                reported as a conflict, never silently reused).
  --only=s      keeps cells whose name contains s; comma-separated values are
                alternatives, repeated --only flags must all match.
  --seeds=0,1   replaces the grid's seeds.
  --parallel=N  runs N cells at once (on GPUs: XLA preallocation is turned off
                unless XLA_PYTHON_CLIENT_* is set; on CPUs the cells share cores).

Several grid processes may share a root (the README runs two at once on two
cores): each marks the cell it runs with `<cell>/running.lock`, and the others
skip that cell as busy (a lock whose process died on this host is taken over).

Each cell's stdout/stderr go to `<cell>/log.txt`, its command to
`<cell>/command.txt`, and each finished attempt appends a line (time, cell,
exit status, wall seconds, command) to `<root>/commands.txt`.

Collect one or more roots (comma-separated or repeated --root):

    python experiments/grid.py collect --root=experiments/results/runs/rt_main \
        --out=experiments/results/rt_main

writes `<out>.csv` (one row per finished cell), `<out>.md` (mean +- sd over
seeds per setting, the paired difference ANADP - DP-SGD at the same task,
model, fine-tuning, target epsilon, steps and seed, and ANADP's final noise
scales and importance/|theta| correlation), `<out>_accuracy_vs_epsilon.png`
and, when ANADP ran at several gammas, `<out>_sweep.png`. Grids that share a
root are told apart with --grid:

    python experiments/grid.py collect --root=experiments/results/runs/rt_main \
        --grid=rt_sweep --out=experiments/results/rt_sweep

Cell names: `<task>-<finetune>-<method>[-global][-<importance>-g<gamma>-r<rho>]
-eps<target>-seed<seed>` (non-private cells have no epsilon; `sigma<z>`
replaces `eps<target>` when privacy.noise_multiplier is set). They are built
from the cell's effective config, so the same run has the same name in every
grid: grids run into one shared --root reuse each other's cells.

This file is the command line only: the grids are defined in
experiments/grids.py, turned into cells by experiments/cells.py, run by
experiments/runner.py and collected by experiments/collect.py (figures:
experiments/figures.py).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # run as a script: `experiments` and `configs` are imported from the repository

from experiments.cells import parse_seeds, plan, split_list  # noqa: E402
from experiments.collect import collect  # noqa: E402
from experiments.grids import GRIDS  # noqa: E402
from experiments.runner import run_grid  # noqa: E402

RUNS = os.path.join(REPO, "experiments", "results", "runs")  # a grid's default root: RUNS/<grid>


def list_grids() -> int:
    for name, spec in GRIDS.items():
        cells = plan(name, os.path.join(RUNS, name))
        print(f"{name} ({len(cells)} cells, seeds {','.join(map(str, spec.seeds))}): {spec.description}")
    return 0


def collect_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grid.py collect", description="Collects summary.json files.")
    p.add_argument("--root", action="append", required=True,
                   help="a folder of runs (searched recursively); comma-separated or repeated")
    p.add_argument("--out", default=None,
                   help="output prefix (default experiments/results/<name of the first root>)")
    p.add_argument("--grid", action="append", default=None,
                   help="keep only these grids' settings (comma-separated or repeated), e.g. when "
                        "several grids share one root")
    args = p.parse_args(argv)
    roots = split_list(args.root)
    out = args.out or os.path.join(REPO, "experiments", "results", os.path.basename(os.path.normpath(roots[0])))
    try:
        collect(roots, out, split_list(args.grid))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _is_done(cell) -> bool:
    return os.path.exists(os.path.join(cell.path(), "summary.json"))


def run_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="grid.py", description="Runs a grid of launch.py cells.")
    p.add_argument("grid", choices=sorted(GRIDS))
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field in every cell, e.g. --set=train.epochs=3 (repeatable)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the grid's)")
    p.add_argument("--only", action="append", default=None,
                   help="keep cells whose name contains this (comma: any of; repeated: all of)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--root", default=None, help="default experiments/results/runs/<grid>")
    p.add_argument("--parallel", type=int, default=1, help="cells run at once")
    args = p.parse_args(argv)
    root = os.path.abspath(args.root) if args.root else os.path.join(RUNS, args.grid)
    try:
        cells = plan(args.grid, root, seeds=parse_seeds(args.seeds), sets=args.set, only=args.only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cells:
        print("error: no cells left (check --only)", file=sys.stderr)
        return 2
    if args.dry_run:
        for cell in cells:
            print(("# done: " if _is_done(cell) else "") + cell.command_text)
        print(f"# {len(cells)} cells, {sum(map(_is_done, cells))} done, root {root}")
        return 0
    status = run_grid(cells, root, parallel=max(1, args.parallel))
    return 0 if all(s in ("ok", "done") for s in status.values()) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("grids: " + ", ".join(GRIDS))
        return 0
    if argv[0] == "list":
        return list_grids()
    if argv[0] == "collect":
        return collect_command(argv[1:])
    return run_command(argv)


if __name__ == "__main__":
    sys.exit(main())
