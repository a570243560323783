"""The benchmark grid of `experiments/gpu_check.sh`, every cell in one process.

    python experiments/gpu_check.py --grid=full --out=DIR --budget_s=300
    python experiments/gpu_check.py --grid=tiny --out=DIR       # tiny-bert, one cell (CPU)

A cell is (model, fine-tuning, dtype, physical batch); each cell times the
non-private, DP-SGD and ANADP steps with `experiments/benchmark.py`'s own
functions (interleaved rounds, median, XLA's peak memory), with the ghost
clipping engine and one pass per step (microbatch = batch). One process for
the grid: a fresh interpreter per cell would pay the imports and the device's
start-up every time, and each model's random weights are drawn once and shared
by its cells (the dtype is the model's, not the parameters': they stay float32).

Cells run until the time budget would be overrun: a cell is skipped when less
time is left than the last cell of its model took. A cell that fails (out of
memory, say) is recorded with its error and the grid goes on. `benchmarks.json`
and `benchmarks.md` in `--out` are rewritten after every cell, so a run killed
from outside keeps what it finished. The batches are random tokens, so these
timings say nothing about any data (docs/privacy.md marks the timings of real
batches as non-private).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from anadp import models  # noqa: E402
from experiments import benchmark  # noqa: E402

METHODS = ("non_private", "dp_sgd", "anadp")
GRIDS = {
    "full": {
        "models": ("minilm-l6-random", "roberta-base-random"),
        "finetunes": ("full", "lora"),
        "batch_sizes": (32, 256),
        "dtypes": ("float32", "bfloat16"),
        "seq_len": 128,
        "repeats": 3,
    },
    "tiny": {
        "models": ("tiny-bert",),
        "finetunes": ("lora",),
        "batch_sizes": (4,),
        "dtypes": ("bfloat16",),
        "seq_len": 8,
        "repeats": 1,
    },
}


def cell_args(model_name: str, finetune: str, dtype: str, batch_size: int, grid: dict) -> dict:
    """The argument dict `benchmark.prepare_method` reads (and the table prints)."""
    return {
        "model": model_name,
        "finetune": finetune,
        "dtype": dtype,
        "batch_size": batch_size,
        "microbatch_size": batch_size,  # one pass: the ghost engine needs no microbatches to fit
        "seq_len": grid["seq_len"],
        "engine": "ghost",
        "logical": batch_size,
        "repeats": grid["repeats"],
    }


def time_cell(model, params, batches, args: dict) -> dict:
    """{method: step time, compile time, peak memory, ...} for one cell."""
    prepared = {method: benchmark.prepare_method(method, model, params, batches, args) for method in METHODS}
    return benchmark.time_methods(prepared, args["repeats"], args["logical"])


def error_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def machine() -> dict:
    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run_cell(model, params, batches, args: dict) -> dict:
    """One cell: its timings, or the error that stopped it, and its wall time."""
    print(f"cell {args['model']} {args['finetune']} {args['dtype']} batch {args['batch_size']} ...",
          file=sys.stderr, flush=True)
    cell = {"args": args}
    began = time.monotonic()
    try:
        typed = model.clone(dtype=models.compute_dtype(args["dtype"]))
        cell["methods"] = time_cell(typed, params, batches, args)
        cell["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - one failed cell must not end the grid
        cell["status"] = "failed: " + error_line(error)
    cell["wall_s"] = round(time.monotonic() - began, 1)
    gc.collect()  # the cell's compiled programs and device buffers
    return cell


def skipped_cell(args: dict, left: float, estimate: float) -> dict:
    return {"args": args, "status": f"skipped: {left:.0f} s left of the budget, the last cell took {estimate:.0f} s"}


def run_grid(grid: dict, out_dir: str, budget_s: float) -> list[dict]:
    """Every cell of `grid` that fits in `budget_s`; the report is rewritten after each."""
    start = time.monotonic()
    cells: list[dict] = []
    info = machine()
    for model_name in grid["models"]:
        estimate = 0.0  # the wall time of this model's last cell
        for finetune in grid["finetunes"]:
            model, params = benchmark.build_model(model_name, finetune)  # float32 weights, shared
            for batch_size in grid["batch_sizes"]:
                rng = np.random.default_rng(0)
                batches = [benchmark.random_batch(rng, batch_size, grid["seq_len"], model.config.vocab_size)]
                for dtype in grid["dtypes"]:
                    args = cell_args(model_name, finetune, dtype, batch_size, grid)
                    left = budget_s - (time.monotonic() - start)
                    if left < estimate:
                        cells.append(skipped_cell(args, left, estimate))
                    else:
                        cells.append(run_cell(model, params, batches, args))
                        estimate = cells[-1]["wall_s"]
                    write_report(out_dir, info, cells, grid)
    return cells


TABLE_HEADER = [
    "| model | finetune | dtype | batch | method | step (s) | vs non-private | examples/s | peak memory (MiB) "
    "| compile (s) | status |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def table_rows(cell: dict) -> list[str]:
    a = cell["args"]
    key = f"| {a['model']} | {a['finetune']} | {a['dtype']} | {a['batch_size']} "
    if cell["status"] != "ok":
        return [key + "| - | - | - | - | - | - | " + cell["status"] + " |"]
    methods = cell["methods"]
    base = methods.get("non_private", {}).get("step_time_s")
    rows = []
    for method, r in methods.items():
        ratio = f"{r['step_time_s'] / base:.2f}x" if base else "-"
        rows.append(
            key + f"| {method} | {r['step_time_s']:.4f} | {ratio} | {r['examples_per_s']:.1f} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['compile_time_s']:.1f} | ok |"
        )
    return rows


def markdown(info: dict, cells: list[dict], grid: dict) -> str:
    lines = [
        f"Benchmark grid on {info['backend']} ({info['device']} x{info['devices']}), jax {info['jax']}: "
        f"sequence length {grid['seq_len']}, random tokens, ghost clipping engine, one pass per step "
        f"(microbatch = batch), median of {grid['repeats']} interleaved rounds after a warm-up. "
        "Parameters, optimiser state and mechanism are float32 in every row; `dtype` is what the model "
        "computes in. float32 matrix products run at the backend's default precision (TF32 on recent "
        "NVIDIA GPUs), the mechanism's at HIGHEST.",
        "",
        *TABLE_HEADER,
    ]
    for cell in cells:
        lines += table_rows(cell)
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, info: dict, cells: list[dict], grid: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "benchmarks.json"), "w") as f:
        json.dump({"machine": info, "grid": grid, "cells": cells}, f, indent=1)
    with open(os.path.join(out_dir, "benchmarks.md"), "w") as f:
        f.write(markdown(info, cells, grid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--out", required=True, help="folder for benchmarks.json and benchmarks.md")
    parser.add_argument("--budget_s", type=float, default=300.0, help="start no cell that would overrun this")
    args = parser.parse_args(argv)
    cells = run_grid(GRIDS[args.grid], args.out, args.budget_s)
    print(open(os.path.join(args.out, "benchmarks.md")).read())
    return 0 if any(c["status"] == "ok" for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
