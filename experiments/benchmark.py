"""Step time and memory of non-private, DP-SGD and ANADP steps, side by side in one process.

    python experiments/benchmark.py --model=minilm-l6 --batch_size=32 --seq_len=128 \
        --finetune=full --microbatch_size=32 --out=bench.json

Each method runs the training loop's own jitted functions (`train.make_step_functions`):
one pass over a physical batch (`accumulate`: per-example gradients, clipping and
summing microbatch by microbatch; for non-private training the plain batch
gradient) followed by `apply` (noise, importance, allocation and the optimiser).
Step time is the median over `--repeats` steps after a warm-up step, the methods'
steps interleaved round-robin so that all of them see the same machine; compile
time is measured separately. Peak memory is the step's resident device memory
by XLA's own account: the larger of (a pass: its arguments, outputs and
temporaries, plus the optimiser and mechanism states and, for several passes,
the running sum) and (the update: the same for `apply`, plus the frozen
parameters). It is comparable across methods in one process and between CPU
and GPU.

`--dtype=bfloat16` builds the model with `dtype=bfloat16` (config
`train.dtype`): bfloat16 activations and matrix products, float32 parameters,
optimiser state and mechanism, exactly as training runs it. Matrix products
run at the backend's default precision in both dtypes (as in training: on a GPU
float32 products are TF32), except the mechanism's own, which are always
HIGHEST. `--model=minilm-l6-random` and `roberta-base-random` are random
weights of the real shapes (no checkpoint needed).

`--logical_batch_size` > batch_size runs the step as the training loop does
for a large expected batch: several passes of `batch_size` rows accumulated
before one noisy update. `--sst2_throughput` also reports SST-2 examples per
second with and without length buckets.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from anadp import models, train  # noqa: E402
from anadp.data.batching import bucket_length, parse_buckets, take_batch  # noqa: E402
from configs import base  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "minilm-l6",
                    "minilm-l6, minilm-l6-random, roberta-base-random, tiny-bert, or a local HF folder")
flags.DEFINE_integer("batch_size", 32, "physical batch (rows per compiled pass)")
flags.DEFINE_integer("seq_len", 128, "sequence length")
flags.DEFINE_enum("finetune", "full", list(models.FINETUNE_MODES), "which parameters train")
flags.DEFINE_integer("microbatch_size", 32, "rows per vmap inside a pass")
flags.DEFINE_enum("engine", "vmap", ["vmap", "ghost"], "DP clipping engine (config train.clipping_engine)")
flags.DEFINE_integer("logical_batch_size", 0, "> batch_size: accumulate this many rows per update")
flags.DEFINE_list("methods", ["non_private", "dp_sgd", "anadp"], "methods to time")
flags.DEFINE_integer("repeats", 9, "timed steps per method (median reported)")
flags.DEFINE_enum("dtype", "float32", list(models.COMPUTE_DTYPES),
                  "what the model computes in (config train.dtype); parameters stay float32")
flags.DEFINE_bool("sst2_throughput", False, "also measure SST-2 examples/s with and without length buckets")
flags.DEFINE_string("out", "bench.json", "JSON output; a Markdown table is written beside it (.md)")
flags.DEFINE_string("pytorch_json", "", "experiments/compare_pytorch.py's JSON from the same sitting: print the ratios")

# Which PyTorch step each of ours is held against (compare_pytorch.py's method names).
PYTORCH_COUNTERPART = {"non_private": "pytorch_eager_non_private", "dp_sgd": "opacus_ghost_dp_sgd"}


# Random weights of a real model's shapes: no checkpoint, no download.
RANDOM_SHAPES = {
    "minilm-l6-random": models.minilm_l6_config,
    "roberta-base-random": models.roberta_base_config,
}


def build_model(name: str, finetune: str, dtype: str = "float32"):
    lora = models.LoraConfig() if finetune == "lora" else None
    if name in RANDOM_SHAPES:
        return models.from_config(RANDOM_SHAPES[name](), 2, lora=lora, seed=0, dtype=dtype)
    return models.from_pretrained(name, 2, lora=lora, seed=0, dtype=dtype)


def make_config(method: str, batch_size: int, microbatch_size: int, engine: str = "vmap"):
    config = base.get_config()
    config.privacy.method = method
    config.train.physical_batch_size = batch_size
    config.train.microbatch_size = min(microbatch_size, batch_size)
    config.train.clipping_engine = engine
    return config


def random_batch(rng, rows: int, seq_len: int, vocab: int) -> dict:
    return {
        "input_ids": rng.integers(1000, vocab, size=(rows, seq_len), dtype=np.int32),
        "attention_mask": np.ones((rows, seq_len), np.int32),
        "token_type_ids": np.zeros((rows, seq_len), np.int32),
        "labels": rng.integers(0, 2, size=(rows,), dtype=np.int32),
    }


def compiled_bytes(jitted, *args) -> int:
    """XLA's peak estimate for one compiled call: arguments + outputs + temporaries."""
    analysis = jitted.lower(*args).compile().memory_analysis()
    if analysis is None:
        return -1
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def tree_bytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "nbytes")))


def block(tree):
    return jax.tree_util.tree_map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def build_step(method, model, params, args, expected_batch_size: float):
    """One method's compiled step functions and a fresh state to feed them.

    Returns (fns, state, frozen, mechanism, mask); mechanism is None for non_private.
    """
    config = make_config(method, args["batch_size"], args["microbatch_size"], args["engine"])
    trainable, frozen = models.partition(params, args["finetune"])
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)  # `apply` donates its state
    optimizer = train.make_optimizer(config.train, total_steps=1000)
    mechanism = None
    if method != "non_private":
        mechanism = train.mechanism_from_config(config, noise_multiplier=1.0, expected_batch_size=expected_batch_size)
    fns = train.make_step_functions(model, mechanism, optimizer, config)
    state = train.TrainState(trainable, optimizer.init(trainable), mechanism.init(trainable) if mechanism else ())
    mask = jnp.ones(args["batch_size"], jnp.float32)
    return fns, state, frozen, mechanism, mask


def prepare_method(method, model, params, batches, args) -> dict:
    """Compiles one method's step; returns its step closure, compile time and peak memory."""
    fns, state, frozen, mechanism, mask = build_step(method, model, params, args, float(args["logical"]))
    holder = {"state": state}

    def one_step():  # train.train_step without the sampler: the same passes every step
        state = holder["state"]
        summed = train.sum_passes(fns, mechanism, state, frozen, ((batch, mask) for batch in batches))
        holder["state"] = block(fns.apply(state, summed, jnp.float32(args["logical"])))

    scales = mechanism.clip_scales(state.mechanism) if mechanism else None
    t0 = time.perf_counter()
    accumulate_bytes = compiled_bytes(fns.accumulate, state.trainable, frozen, scales, batches[0], mask)
    summed = block(fns.accumulate(state.trainable, frozen, scales, batches[0], mask))
    apply_bytes = compiled_bytes(fns.apply, state, summed, jnp.float32(1.0))
    compile_time = time.perf_counter() - t0
    # What stays resident while each function runs without being one of its
    # arguments: the optimiser and mechanism states during a pass (plus the running
    # sum when a step takes several passes), the frozen parameters during `apply`.
    held_during_passes = tree_bytes((state.opt_state, state.mechanism)) + (
        tree_bytes(summed) if len(batches) > 1 else 0
    )
    memory = max(accumulate_bytes + held_during_passes, apply_bytes + tree_bytes(frozen))
    one_step()  # warm-up (also compiles apply)
    return {"step": one_step, "compile_time_s": compile_time, "peak_memory_bytes": memory}


def time_methods(prepared: dict, repeats: int, logical: int) -> dict:
    """Median step time of each method, the methods' steps interleaved round-robin.

    Interleaving puts every method under the same machine conditions (other load,
    clock changes), so the ratios between methods are what this benchmark reports
    most reliably; running one method's repeats after another's does not.
    """
    times = {method: [] for method in prepared}
    for _ in range(repeats):
        for method, p in prepared.items():
            t0 = time.perf_counter()
            p["step"]()
            times[method].append(time.perf_counter() - t0)
    results = {}
    for method, p in prepared.items():
        step_time = statistics.median(times[method])
        results[method] = {
            "step_time_s": step_time,
            "step_time_spread_s": [min(times[method]), max(times[method])],
            "compile_time_s": p["compile_time_s"],
            "peak_memory_bytes": p["peak_memory_bytes"],
            "examples_per_s": logical / step_time,
            "time_per_example_s": step_time / logical,
        }
    return results


def sst2_throughput(model, params, args) -> dict:
    """DP-SGD examples/s on real SST-2 batches, bucketed by length vs padded to seq_len."""
    from anadp import data as data_lib

    task = data_lib.load_task("sst2", models.tokenizer(FLAGS.model), args["seq_len"])
    rng = np.random.default_rng(0)
    buckets = parse_buckets(base.get_config().data.bucket_lengths)
    out = {}
    for label, use_buckets in (("bucketed", True), ("fixed_length", False)):
        fns, state, frozen, _, mask = build_step("dp_sgd", model, params, args, float(args["batch_size"]))
        # warm every bucket so compilation is not timed
        draws = [rng.choice(len(task.train["labels"]), args["batch_size"], replace=False) for _ in range(12)]
        lengths = [
            bucket_length(task.train["lengths"][d], buckets, args["seq_len"]) if use_buckets else args["seq_len"]
            for d in draws
        ]
        for length in sorted(set(lengths)):
            batch = take_batch(task.train, draws[0], length)
            block(fns.accumulate(state.trainable, frozen, None, batch, mask))
        t0 = time.perf_counter()
        for d, length in zip(draws, lengths):
            block(fns.accumulate(state.trainable, frozen, None, take_batch(task.train, d, length), mask))
        elapsed = time.perf_counter() - t0
        out[label] = {"examples_per_s": len(draws) * args["batch_size"] / elapsed, "lengths": sorted(set(lengths))}
    return out


def markdown(results: dict, args: dict) -> str:
    lines = [
        f"model `{args['model']}`, finetune `{args['finetune']}`, physical batch {args['batch_size']}, "
        f"logical batch {args['logical']}, microbatch {args['microbatch_size']}, seq_len {args['seq_len']}, "
        f"clipping engine `{args['engine']}`, "
        f"dtype {args['dtype']} (float32 parameters), {results['machine']['backend']} "
        f"({results['machine']['devices']})",
        "",
        "| method | step time (s) | vs non-private | compile (s) | peak memory (MB) | examples/s |",
        "|---|---|---|---|---|---|",
    ]
    base_time = results["methods"].get("non_private", {}).get("step_time_s")
    for method, r in results["methods"].items():
        ratio = f"{r['step_time_s'] / base_time:.2f}x" if base_time else "-"
        lines.append(
            f"| {method} | {r['step_time_s']:.3f} | {ratio} | {r['compile_time_s']:.1f} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['examples_per_s']:.1f} |"
        )
    if "sst2" in results:
        s = results["sst2"]
        lines += ["", f"SST-2 DP-SGD examples/s: bucketed {s['bucketed']['examples_per_s']:.1f} "
                      f"(lengths {s['bucketed']['lengths']}), fixed length {args['seq_len']}: "
                      f"{s['fixed_length']['examples_per_s']:.1f}"]
    if "pytorch" in results:
        lines += ["", *pytorch_lines(results["methods"], results["pytorch"])]
    lines += ["", f"command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


def pytorch_lines(methods: dict, pytorch: dict) -> list[str]:
    """Our step time against PyTorch's on the same shapes (compare_pytorch.py's JSON)."""
    meta = pytorch.get("_meta", {})
    lines = [f"PyTorch (torch {meta.get('torch', '?')}, opacus {meta.get('opacus', '?')}, "
             f"{meta.get('threads', '?')} threads; `{meta.get('command', '?')}`):", "",
             "| ours | step time (s) | PyTorch | step time (s) | ours / PyTorch |", "|---|---|---|---|---|"]
    for ours, theirs in PYTORCH_COUNTERPART.items():
        if ours in methods and theirs in pytorch:
            a, b = methods[ours]["step_time_s"], pytorch[theirs]["step_time_s"]
            lines.append(f"| {ours} | {a:.3f} | {theirs} | {b:.3f} | {a / b:.2f}x |")
    return lines


def read_pytorch_json(path: str, args: dict) -> dict:
    """compare_pytorch.py's results; refused when its shapes are not this benchmark's."""
    with open(path) as f:
        pytorch = json.load(f)
    theirs = pytorch.get("_meta", {}).get("args", {})
    if (args["finetune"], args["dtype"]) != ("full", "float32"):
        raise app.UsageError("--pytorch_json: compare_pytorch.py trains every parameter in float32; "
                             "run this benchmark with --finetune=full --dtype=float32")
    for key in ("model", "batch_size", "seq_len"):
        if theirs.get(key) != args[key]:
            raise app.UsageError(f"--pytorch_json={path}: its {key} is {theirs.get(key)!r}, this run's {args[key]!r}")
    return pytorch


def main(argv):
    del argv
    args = {
        "model": FLAGS.model,
        "batch_size": FLAGS.batch_size,
        "seq_len": FLAGS.seq_len,
        "finetune": FLAGS.finetune,
        "microbatch_size": FLAGS.microbatch_size,
        "engine": FLAGS.engine,
        "logical": max(FLAGS.logical_batch_size, FLAGS.batch_size),
        "repeats": FLAGS.repeats,
        "dtype": FLAGS.dtype,
    }
    if args["logical"] % args["batch_size"]:
        raise app.UsageError("--logical_batch_size must be a multiple of --batch_size")
    pytorch = read_pytorch_json(FLAGS.pytorch_json, args) if FLAGS.pytorch_json else None
    model, params = build_model(FLAGS.model, FLAGS.finetune, FLAGS.dtype)
    rng = np.random.default_rng(0)
    passes = args["logical"] // args["batch_size"]
    batches = [random_batch(rng, args["batch_size"], args["seq_len"], model.config.vocab_size) for _ in range(passes)]
    results = {
        "args": args,
        "command": "python " + " ".join(sys.argv),
        "machine": {
            "backend": jax.default_backend(),
            "devices": str(jax.devices()[0].device_kind),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
        },
        "num_trainable_params": models.count_params(models.partition(params, FLAGS.finetune)[0]),
        "methods": {},
    }
    prepared = {}
    for method in FLAGS.methods:
        print(f"compiling {method} ...", file=sys.stderr, flush=True)
        prepared[method] = prepare_method(method, model, params, batches, args)
    print(f"timing {', '.join(FLAGS.methods)}, interleaved, {FLAGS.repeats} rounds ...", file=sys.stderr, flush=True)
    results["methods"] = time_methods(prepared, FLAGS.repeats, args["logical"])
    print(json.dumps(results["methods"]), file=sys.stderr, flush=True)
    if FLAGS.sst2_throughput:
        results["sst2"] = sst2_throughput(model, params, args)
    if pytorch is not None:
        results["pytorch"] = pytorch
    # the JSON maps each method to its numbers; run metadata sits under "_meta"
    out = {**results["methods"], "_meta": {k: v for k, v in results.items() if k != "methods"}}
    for key in ("sst2", "pytorch"):
        if key in results:
            out["_meta"][key] = results[key]
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(out, f, indent=2)
    table = markdown(results, args)
    with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    from anadp import heap

    heap.reexec_with_heap_settings()  # as launch.py: the step is timed as training runs it
    app.run(main)
