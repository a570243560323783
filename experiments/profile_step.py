"""Where one pass of the training step spends its time, by kind of XLA operation.

    python experiments/profile_step.py --model=minilm-l6-random --finetune=full --method=non_private \
        --batch_size=32 --seq_len=128 --table=experiments/results/profile_step.md

Traces `--steps` calls of the training loop's own pass (`fns.accumulate`, as
experiments/benchmark.py builds it) with the JAX profiler, reads each XLA
thunk's time from the trace, and sorts the thunks by what their fused
computation does: matrix products, broadcasts materialised as buffers,
transposes and copies, reductions, exponentials, gathers and scatters, the
rest. The arithmetic rate of the matrix products is XLA's flop count of the
whole pass over their time (the pass's other flops are a few percent).

`experiments/compare_pytorch.py --profile` gives the same breakdown for
PyTorch eager, by ATen operator.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

# The per-thunk trace events exist only with this flag, read when the backend starts.
TRACEME = "--xla_cpu_enable_xprof_traceme=true"
if TRACEME not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TRACEME}".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmark  # noqa: E402

FLAGS = flags.FLAGS
# --model, --finetune, --engine, --dtype, --batch_size and --seq_len are benchmark.py's flags.
flags.DEFINE_enum("method", "non_private", ["non_private", "dp_sgd", "anadp"], "whose pass to profile")
flags.DEFINE_integer("steps", 3, "traced passes (after a warm-up pass)")
flags.DEFINE_string("table", "", "Markdown output (also printed)")

# Checked in this order: a fusion with a dot in it is a matrix product, and so on.
KINDS = (
    ("dot", "matrix products"),
    ("scatter", "scatters"),
    ("gather", "gathers"),
    ("reduce", "reductions"),
    ("exponential", "exponentials"),
    ("transpose", "transposes and copies"),
    ("copy", "transposes and copies"),
    ("broadcast", "elementwise with a materialised broadcast"),
)


def operations_by_name(hlo_text: str) -> dict[str, set[str]]:
    """Each instruction of the optimised HLO -> the opcodes it executes (its fused
    computation's, for a fusion)."""
    computations, instructions, current = {}, {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = header.group(1)
            computations[current] = set()
            continue
        op = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w+)\((.*)", line)
        if op and current is not None:
            name, opcode, rest = op.groups()
            computations[current].add(opcode)
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            instructions[name] = (opcode, called.group(1) if called else None)
    return {name: (computations.get(called, set()) if called else {opcode})
            for name, (opcode, called) in instructions.items()}


def kind_of(opcodes: set[str]) -> str:
    for opcode, kind in KINDS:
        if opcode in opcodes:
            return kind
    return "other elementwise"


def thunk_times(trace_dir: str) -> collections.Counter:
    """Total microseconds per thunk name in the (one) perfetto trace under `trace_dir`."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    times = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            times[e["name"]] += e.get("dur", 0)
    return times


def profile(args: dict) -> dict:
    model, params = benchmark.build_model(args["model"], args["finetune"], args["dtype"])
    fns, state, frozen, mechanism, mask = benchmark.build_step(args["method"], model, params, args,
                                                              float(args["batch_size"]))
    batch = benchmark.random_batch(np.random.default_rng(0), args["batch_size"], args["seq_len"],
                                   model.config.vocab_size)
    scales = mechanism.clip_scales(state.mechanism) if mechanism else None
    call = (state.trainable, frozen, scales, batch, mask)
    compiled = fns.accumulate.lower(*call).compile()
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
    operations = operations_by_name(compiled.as_text())
    benchmark.block(fns.accumulate(*call))  # warm-up
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(args["steps"]):
                benchmark.block(fns.accumulate(*call))
            wall_ms = (time.perf_counter() - start) / args["steps"] * 1e3
        times = thunk_times(trace_dir)
    by_kind = collections.Counter()
    for name, us in times.items():
        if name in operations:  # the rest are runtime events that enclose the thunks
            by_kind[kind_of(operations[name])] += us
    per_pass_ms = {kind: us / args["steps"] / 1e3 for kind, us in by_kind.most_common()}
    matmul_s = per_pass_ms.get("matrix products", 0.0) / 1e3
    return {"args": args, "per_pass_ms": per_pass_ms, "wall_ms": wall_ms, "flops": flops,
            "matmul_gflops_per_s": flops / matmul_s / 1e9 if matmul_s else None}


def markdown(result: dict) -> str:
    a = result["args"]
    total = sum(result["per_pass_ms"].values())
    lines = [
        f"{a['method']} pass, {a['model']}, {a['finetune']} fine-tuning, {a['dtype']}, batch {a['batch_size']}, "
        f"length {a['seq_len']}, jax {jax.__version__} on {jax.default_backend()}; "
        f"{a['steps']} traced passes. Command: `{result['command']}`",
        "",
        "| operations | ms per pass | share |",
        "|---|---|---|",
    ]
    lines += [f"| {kind} | {ms:.1f} | {100 * ms / total:.1f}% |" for kind, ms in result["per_pass_ms"].items()]
    lines.append(f"| all operations | {total:.1f} | 100% |")
    rate = result["matmul_gflops_per_s"]
    lines += ["", f"Wall time per traced pass: {result['wall_ms']:.1f} ms (the operations run on "
              "several threads, so their sum can exceed it). "
              f"XLA's flop count of the pass: {result['flops'] / 1e9:.1f} GFLOP"
              + (f"; over the matrix products' time, {rate:.0f} GFLOP/s." if rate else ".")]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    args = {name: getattr(FLAGS, name) for name in
            ("model", "finetune", "method", "engine", "dtype", "batch_size", "seq_len", "steps")}
    args["microbatch_size"] = args["batch_size"]
    result = profile(args)
    result["command"] = "python " + " ".join(sys.argv)
    text = markdown(result)
    print(text)
    if FLAGS.table:
        with open(FLAGS.table, "w") as f:
            f.write(text)


if __name__ == "__main__":
    from anadp import heap

    heap.reexec_with_heap_settings()  # as launch.py: the pass is profiled as training runs it
    app.run(main)
