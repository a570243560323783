"""Runs a grid's cells: one `python launch.py` subprocess per cell, resumable and shareable.

A cell whose summary.json exists is skipped (a grid cut short resumes where it
stopped; a cell killed mid-run resumes from its last checkpoint), unless that
summary disagrees with the cell's command: then it is a conflict, never
silently reused. Several grid processes may share a root: each marks the cell
it runs with `<cell>/running.lock`, and the others skip that cell as busy.

Each cell's stdout/stderr go to `<cell>/log.txt`, its command to
`<cell>/command.txt`, and each finished attempt appends a line (time, cell,
exit status, wall seconds, command) to `<root>/commands.txt`.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from experiments.cells import REPO, Cell

# run_grid's statuses that leave a cell without a usable result: crashed, finished
# with other settings than the cell's, or being run by another live grid process.
NOT_FINISHED = ("failed", "conflict", "busy")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a, b) -> bool:
    """Equal, floats up to rounding (a summary's JSON may not round-trip a float exactly)."""
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


def config_conflicts(ran: dict, wanted: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Fields of two nested configs that differ, apart from the dotted fields in `ignore`
    (fields only one of them has are ignored too: a run written by older code lacks
    the fields added since)."""
    ran, wanted = _flatten(ran), _flatten(wanted)
    return [f"{k}: ran {ran[k]!r}, wanted {wanted[k]!r}"
            for k in sorted(wanted) if k in ran and k not in ignore and not _same(ran[k], wanted[k])]


def summary_conflicts(cell: Cell, summary: dict) -> list[str]:
    """Config fields where a finished run's summary disagrees with what the cell would run."""
    return config_conflicts(summary.get("config", {}), cell.effective)


def _summary_path(cell: Cell) -> str:
    return os.path.join(cell.path(), "summary.json")


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def execute(cell: Cell, env: dict) -> int:
    """Runs one cell's launch.py to completion; output appended to <cell>/log.txt."""
    workdir = cell.path()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "command.txt"), "w") as f:
        f.write(cell.command_text + "\n")
    with open(os.path.join(workdir, "log.txt"), "a") as log:
        log.write(f"\n=== {_now()} {cell.command_text}\n")
        log.flush()
        return subprocess.run(cell.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


# A grid process marks each cell it is running with <cell>/running.lock ("host pid"),
# so that two grids sharing a root (their common DP-SGD cells) never run one cell
# into the same workdir at once. A lock left by a process that died on this host is
# taken over; one from another host is respected until someone deletes it.
LOCK_NAME = "running.lock"


def _lock_holder_alive(path: str) -> bool:
    try:
        with open(path) as f:
            host, pid = f.read().split()
        pid = int(pid)
    except (OSError, ValueError):
        return True  # being written right now, or unreadable: do not take it
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(cell: Cell) -> bool:
    """Takes the cell's lock for this process; False when a live process holds it."""
    os.makedirs(cell.path(), exist_ok=True)
    path = os.path.join(cell.path(), LOCK_NAME)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _lock_holder_alive(path):
                return False
            try:
                os.remove(path)  # stale: its process is gone
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    return False


def release(cell: Cell) -> None:
    try:
        os.remove(os.path.join(cell.path(), LOCK_NAME))
    except FileNotFoundError:
        pass


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def finished_status(cell: Cell, out) -> str | None:
    """done or conflict for a cell that has a summary.json (a conflict is reported to `out`); None if it has none."""
    if not os.path.exists(_summary_path(cell)):
        return None
    try:
        with open(_summary_path(cell)) as f:
            conflicts = summary_conflicts(cell, json.load(f))
    except (OSError, json.JSONDecodeError) as e:
        conflicts = [f"unreadable summary.json ({e})"]
    if not conflicts:
        return "done"
    print(f"conflict {cell.name}: its summary.json does not match this grid's command "
          f"(use another --root): " + "; ".join(conflicts[:5]), file=out)
    return "conflict"


def cell_environment(parallel: int) -> dict[str, str]:
    """The environment of the cells' subprocesses."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if parallel > 1 and not any(k.startswith("XLA_PYTHON_CLIENT_") for k in env):
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # several processes share an accelerator
    return env


def _attempt(cell: Cell, runner: Callable[[Cell, dict], int], env: dict, out) -> tuple[int, float]:
    """Runs a claimed cell; (exit status, wall seconds), -1 when the runner raised."""
    start = time.time()
    try:
        rc = runner(cell, env)
    except Exception as e:  # noqa: BLE001 - a cell's failure must not stop the grid
        print(f"{cell.name}: could not run ({e!r})", file=out)
        rc = -1
    return rc, time.time() - start


def _result_text(cell: Cell) -> str:
    """The dev metric and epsilon of a finished cell, for its progress line ("" if unreadable)."""
    try:
        with open(_summary_path(cell)) as f:
            s = json.load(f)
        metric = s["main_metric"]
        return f"  dev {metric} {s['eval'][metric]:.4f}, epsilon {s['epsilon']:.3g}"
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError):
        return ""


def _report(cell: Cell, root: str, rc: int, wall: float, progress: str, out) -> str:
    """Records a finished attempt in <root>/commands.txt and prints its progress line; returns ok or failed."""
    ok = rc == 0 and os.path.exists(_summary_path(cell))
    with open(os.path.join(root, "commands.txt"), "a") as f:
        f.write(f"{_now()}\t{cell.name}\trc={rc}\t{wall:.1f}s\t{cell.command_text}\n")
    print(f"{progress} {'ok' if ok else 'FAILED (rc=' + str(rc) + ')'} {cell.name} "
          f"({wall:.0f} s){_result_text(cell) if ok else ''}", file=out, flush=True)
    if not ok:
        print("    " + _tail(os.path.join(cell.path(), "log.txt")).replace("\n", "\n    "), file=out)
    return "ok" if ok else "failed"


def run_grid(cells: list[Cell], root: str, *, parallel: int = 1, runner=execute, out=sys.stdout) -> dict[str, str]:
    """Runs every cell without a summary.json; returns {cell name: done | ok | failed | conflict | busy}
    (busy: another live grid process is running it)."""
    os.makedirs(root, exist_ok=True)
    status: dict[str, str] = {}
    todo = []
    for cell in cells:
        finished = finished_status(cell, out)
        if finished is None:
            todo.append(cell)
        else:
            status[cell.name] = finished
    print(f"{len(cells)} cells in {root}: {sum(s == 'done' for s in status.values())} already done, "
          f"{len(todo)} to run" + (f", {parallel} at a time" if parallel > 1 else ""), file=out, flush=True)

    env = cell_environment(parallel)
    lock = threading.Lock()  # status, commands.txt and the progress lines are shared by the threads
    counter = itertools.count(1)

    def one(cell: Cell) -> None:
        if not claim(cell):
            with lock:
                status[cell.name] = "busy"
                print(f"busy {cell.name}: another grid process is running it (if none is, delete "
                      f"{os.path.join(cell.path(), LOCK_NAME)})", file=out, flush=True)
            return
        try:
            if os.path.exists(_summary_path(cell)):  # finished by another process since the plan
                with lock:
                    status[cell.name] = "done"
                return
            rc, wall = _attempt(cell, runner, env, out)
        finally:
            release(cell)
        with lock:
            status[cell.name] = _report(cell, root, rc, wall, f"[{next(counter)}/{len(todo)}]", out)

    if parallel <= 1:
        for cell in todo:  # one at a time, in this thread
            one(cell)
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(one, todo))
    _print_totals(status, out)
    return status


def _print_totals(status: dict[str, str], out) -> None:
    counts = Counter(status.values())
    print("grid finished: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), file=out, flush=True)
    unfinished = [n for n, s in status.items() if s in NOT_FINISHED]
    if unfinished:
        print("not finished: " + " ".join(unfinished), file=out)
