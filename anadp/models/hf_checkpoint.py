"""Hugging Face checkpoints as numpy arrays: reading ``model.safetensors`` (single
or sharded) with ``safetensors.numpy`` (no torch), and mapping its tensor names
onto our parameter tree (``hf_key``, ``convert_checkpoint``; ``anadp.export``
maps back with the same ``hf_key``)."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .lora import LORA_LEAVES, LORA_SCALE, flatten_params, unflatten_params

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Non-parameter buffers some checkpoints carry; silently ignored.
_IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclasses.dataclass
class LoadReport:
    """What ``from_pretrained`` did with a checkpoint.

    - ``missing``: model parameters (``/``-joined paths) that the checkpoint
      lacks and that were left at their random initialisation; the new head and
      the LoRA factors are not counted here (see ``initialized``);
    - ``unexpected``: checkpoint tensors the model does not use (e.g. a BERT
      checkpoint's MLM head, RoBERTa's pooler under a RoBERTa classifier);
    - ``mismatched``: ``(name, checkpoint shape, model shape)`` of head tensors
      whose shapes differ (e.g. another ``num_labels``); re-initialised;
    - ``initialized``: parameters initialised from ``seed``: the task head when
      the checkpoint has none (or a mismatched one), and LoRA factors.
    """

    source: str
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = dataclasses.field(default_factory=list)
    initialized: list[str] = dataclasses.field(default_factory=list)
    loaded: int = 0



def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    """All tensors of a HF folder (single file or sharded), as numpy arrays."""
    single = os.path.join(folder, WEIGHTS_NAME)
    index = os.path.join(folder, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, s) for s in shards]
    else:
        present = sorted(os.listdir(folder))
        hint = ""
        if any(p.endswith((".bin", ".pt", ".pth")) for p in present):
            hint = (" It has PyTorch pickles only; convert them to safetensors "
                    "once (where torch is installed) - loading here avoids torch.")
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {folder!r}.{hint}"
        )
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        tensors.update(_load_file(path))
    return tensors


def _load_file(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (TypeError, ValueError):
        # e.g. bfloat16 tensors, which numpy lacks: read through JAX instead.
        from safetensors.flax import load_file as load_flax

        return {k: np.asarray(v.astype(jnp.float32)) for k, v in load_flax(path).items()}


def _normalise_key(key: str, model_type: str) -> str:
    for prefix in (f"{model_type}.", "bert.", "roberta."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key.endswith(".gamma"):
        key = key[: -len(".gamma")] + ".weight"
    elif key.endswith(".beta"):
        key = key[: -len(".beta")] + ".bias"
    return key


_LAYER_MODULES = {
    ("attention", "query"): "attention.self.query",
    ("attention", "key"): "attention.self.key",
    ("attention", "value"): "attention.self.value",
    ("attention", "output"): "attention.output.dense",
    ("attention", "norm"): "attention.output.LayerNorm",
    ("intermediate",): "intermediate.dense",
    ("output",): "output.dense",
    ("norm",): "output.LayerNorm",
}
_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def hf_key(path: tuple[str, ...]) -> tuple[str, bool] | None:
    """HF checkpoint name (without model prefix) of one of our parameters, and
    whether the dense kernel needs a transpose; None for LoRA leaves."""
    *module, leaf = path
    if leaf in LORA_LEAVES or leaf == LORA_SCALE:
        return None
    name = _LEAF_NAMES[leaf]
    transpose = leaf == "kernel"
    if module[0] == "embeddings":
        sub = "LayerNorm" if module[1] == "norm" else module[1]
        return f"embeddings.{sub}.{name}", transpose
    if module[0] == "encoder":
        idx = int(module[1].split("_")[1])
        return f"encoder.layer.{idx}.{_LAYER_MODULES[tuple(module[2:])]}.{name}", transpose
    if module[0] == "pooler":
        return f"pooler.dense.{name}", transpose
    if module[0] == "classifier":
        return ".".join(["classifier", *module[1:], name]), transpose
    raise KeyError(f"no checkpoint name for {'/'.join(path)}")


def convert_checkpoint(
    tensors: Mapping[str, np.ndarray],
    config: ModelConfig,
    shapes: Mapping,
    source: str = "",
) -> tuple[dict, LoadReport]:
    """Map HF tensors onto our parameter tree.

    ``shapes``: our params tree (arrays or ``ShapeDtypeStruct``s). Returns the
    nested dict of the parameters found (float32; dense kernels transposed to
    (in, out)) and a report; parameters not found are absent from the dict.
    """
    report = LoadReport(source=source)
    ckpt = {}
    for k, v in tensors.items():
        nk = _normalise_key(k, config.model_type)
        if nk in _IGNORED_KEYS:
            continue
        ckpt[nk] = (k, v)
    used: set[str] = set()
    found = {}
    for path, leaf in flatten_params(shapes).items():
        mapped = hf_key(path)
        if mapped is None:
            continue
        key, transpose = mapped
        shape = tuple(leaf.shape)
        is_head = path[0] == "classifier"
        if key not in ckpt:
            if not is_head:
                report.missing.append("/".join(path))
            continue
        orig, value = ckpt[key]
        used.add(key)
        value = np.asarray(value)
        if transpose:
            value = value.T
        if tuple(value.shape) != shape:
            if is_head:
                report.mismatched.append((orig, tuple(value.shape), shape))
                continue
            expected = shape[::-1] if transpose else shape
            raise ValueError(
                f"checkpoint tensor {orig!r} has shape {tuple(np.shape(ckpt[key][1]))}, but "
                f"the config implies {expected} (our {'/'.join(path)}); does config.json "
                f"match the weights in {source!r}?"
            )
        found[path] = np.ascontiguousarray(value, dtype=np.float32)
        report.loaded += 1
    report.unexpected = sorted(ckpt[k][0] for k in ckpt if k not in used)
    return unflatten_params(found), report
