"""PyTorch's step times on this project's benchmark shapes: eager non-private and Opacus ghost DP-SGD.

Runs in its own virtual environment (torch, transformers, opacus; no JAX), never
needed by the library or the tests:

    python -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch transformers opacus
    /tmp/venv-torch/bin/python experiments/compare_pytorch.py --out=pytorch.json
    python experiments/benchmark.py --model=minilm-l6-random --pytorch_json=pytorch.json --out=bench.json

The model is BERT with the shapes of this project's random-weight benchmark
models (`--model=minilm-l6-random`, `roberta-base-random`: the same config dicts,
read from anadp/models/config.py without importing the package), a linear
classifier on the [CLS] pooler, dropout off (as `model.dropout = False` trains),
all parameters trained, Adam at the project's default learning rate. Both
frameworks then run the same arithmetic: one forward and backward over a
physical batch and one optimiser update; Opacus adds clipping at C = 1 with
ghost clipping (`grad_sample_mode="ghost"`: per-example norms from activations
and output gradients, then a second backward of the reweighted loss) and the
Gaussian noise, as this project's ghost engine does.

Step time is the median over --repeats steps after --warmup steps, the two
methods interleaved round-robin so that both see the same machine, exactly as
experiments/benchmark.py times its methods. Writes `{method: {step_time_s,
step_time_spread_s, examples_per_s}, "_meta": {...}}`; benchmark.py prints its
own step time against these when given the file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEARNING_RATE = 1e-2  # configs/base.py's train.learning_rate; the value does not change the step time


def model_config_dict(name: str) -> dict:
    """The HF config dict of a benchmark model, from anadp/models/config.py (which imports no JAX)."""
    path = os.path.join(REPO, "anadp", "models", "config.py")
    spec = importlib.util.spec_from_file_location("_anadp_model_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    factories = {"minilm-l6-random": module.minilm_l6_config, "roberta-base-random": module.roberta_base_config}
    if name not in factories:
        raise ValueError(f"--model={name!r}: one of {', '.join(factories)}")
    return factories[name]()


def build_model(name: str) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    fields = {**model_config_dict(name), "num_labels": 2,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    # RoBERTa's shapes on BERT's module classes: the same matrices, so the same cost
    # (its extra position offset and absent pooler differences are a few rows).
    fields.pop("model_type", None)
    fields.pop("architectures", None)
    config = BertConfig(**fields)
    # "eager" attention: Opacus computes per-example norms from nn.Linear activations,
    # which any attention implementation has; eager keeps both runs on one code path.
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return BertForSequenceClassification(config).train()


def random_batch(rows: int, seq_len: int, vocab: int) -> dict:
    """Token ids, mask, segment and position ids, labels. The segment and position ids
    are passed as contiguous tensors: BERT's own defaults are expanded (strided) views,
    which Opacus 1.6's embedding norms cannot `view`."""
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, vocab, (rows, seq_len), generator=g),
        "attention_mask": torch.ones(rows, seq_len, dtype=torch.long),
        "token_type_ids": torch.zeros(rows, seq_len, dtype=torch.long),
        "position_ids": torch.arange(seq_len).repeat(rows, 1),
        "labels": torch.randint(0, 2, (rows,), generator=g),
    }


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def eager_step(name: str, batch) -> callable:
    """Non-private: forward, mean cross-entropy, backward, Adam."""
    model = build_model(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(**_inputs(batch)).logits, batch["labels"])
        loss.backward()
        optimizer.step()

    return step


def opacus_ghost_step(name: str, batch, noise_multiplier: float = 1.0, clip: float = 1.0) -> callable:
    """DP-SGD with Opacus' ghost clipping: per-example norms, clip, noise, Adam."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    model = build_model(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    # make_private wants a loader (for its sampling rate); the timed steps feed the
    # fixed batch directly, as benchmark.py does, so no sampling is timed.
    loader = DataLoader(TensorDataset(batch["input_ids"], batch["labels"]), batch_size=len(batch["labels"]))
    model, optimizer, criterion, _ = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=nn.CrossEntropyLoss(),
        noise_multiplier=noise_multiplier, max_grad_norm=clip, poisson_sampling=False,
        grad_sample_mode="ghost",
    )

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(**_inputs(batch)).logits, batch["labels"])
        loss.backward()  # both backward passes of ghost clipping
        optimizer.step()

    return step


def time_interleaved(steps: dict, repeats: int, warmup: int) -> dict:
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6-random", help="minilm-l6-random or roberta-base-random")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=9, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    p.add_argument("--methods", default="pytorch_eager_non_private,opacus_ghost_dp_sgd")
    p.add_argument("--out", default="pytorch.json")
    p.add_argument("--profile", action="store_true",
                   help="also profile the eager non-private step by operator (JSON _meta.profile_ms)")
    args = p.parse_args(argv)
    for name, value, low in (("batch_size", args.batch_size, 1), ("seq_len", args.seq_len, 1),
                             ("repeats", args.repeats, 1), ("warmup", args.warmup, 0), ("threads", args.threads, 0)):
        if value < low:
            p.error(f"--{name}={value}: must be >= {low}")
    return args


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_step(step, steps: int = 2) -> dict[str, float]:
    """Self CPU milliseconds per step by ATen operator (matrix products summed),
    from torch.profiler over `steps` calls of `step`: the counterpart of
    experiments/profile_step.py."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    per_op = {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}
    out = {"matrix products (" + ", ".join(MATMULS) + ")": sum(per_op.pop(k, 0.0) for k in MATMULS)}
    out.update(sorted(per_op.items(), key=lambda kv: -kv[1]))
    return out


BUILDERS = {"pytorch_eager_non_private": eager_step, "opacus_ghost_dp_sgd": opacus_ghost_step}


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in BUILDERS]
    if unknown:
        print(f"error: --methods: unknown {', '.join(unknown)} (known: {', '.join(BUILDERS)})", file=sys.stderr)
        return 2
    try:
        vocab = model_config_dict(args.model)["vocab_size"]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or os.cpu_count())
    batch = random_batch(args.batch_size, args.seq_len, vocab)
    steps = {m: BUILDERS[m](args.model, batch) for m in methods}
    times = time_interleaved(steps, args.repeats, args.warmup)
    out = {
        m: {"step_time_s": statistics.median(t), "step_time_spread_s": [min(t), max(t)],
            "examples_per_s": args.batch_size / statistics.median(t)}
        for m, t in times.items()
    }
    import opacus
    import transformers

    out["_meta"] = {
        "args": vars(args), "command": "python " + " ".join(["experiments/compare_pytorch.py", *sys.argv[1:]]),
        "torch": torch.__version__, "transformers": transformers.__version__, "opacus": opacus.__version__,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if args.profile:
        profile_ms = profile_step(eager_step(args.model, batch))
        out["_meta"]["profile_ms"] = profile_ms
        total = sum(profile_ms.values())
        print(f"eager non-private step by operator (self CPU, {total:.0f} ms in all):")
        for op, ms in list(profile_ms.items())[:8]:
            print(f"  {ms:8.1f} ms  {100 * ms / total:5.1f}%  {op}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    for m in methods:
        print(f"{m}: {out[m]['step_time_s']:.3f} s/step (spread {out[m]['step_time_spread_s'][0]:.3f}"
              f"-{out[m]['step_time_spread_s'][1]:.3f}), {out[m]['examples_per_s']:.1f} examples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
