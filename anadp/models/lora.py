"""LoRA configuration, trainable/frozen partitions, merged export, and the
parameter-path helper used for per-layer grouping and plots.

Parameter tree conventions (see ``anadp.models.modeling``)::

    params["embeddings"][...]                          # outside layers
    params["encoder"]["layer_<i>"]["attention"]["query" | "key" | "value" | "output"]
    params["encoder"]["layer_<i>"]["attention"]["norm"]
    params["encoder"]["layer_<i>"]["intermediate" | "output" | "norm"]
    params["pooler"]                                   # BERT only
    params["classifier"]                               # the task head

A LoRA-adapted dense module holds ``kernel``, ``bias``, ``lora_a`` (in, r),
``lora_b`` (r, out) and ``lora_scale`` (the constant alpha / r, a float32
scalar, kept so that ``merge_lora(params)`` needs nothing else; it is always in
the frozen partition).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from anadp.allocation import key_name

# Dense modules inside each transformer layer, as dotted paths relative to the
# layer; LoRA targets match one of these exactly or as a dotted suffix.
LAYER_DENSE_MODULES = (
    "attention.query",
    "attention.key",
    "attention.value",
    "attention.output",
    "intermediate",
    "output",
)

# A LoRA target standing for every entry of LAYER_DENSE_MODULES.
ALL_TARGETS = "all"

FINETUNE_MODES = ("full", "frozen_embeddings", "lora", "bias", "head")
# What finetune="frozen_embeddings" keeps frozen: the embedding layer (word,
# position and token-type tables and their LayerNorm). Its word table is half of
# MiniLM-L6's parameters, and a private step adds noise to every row of it
# although a batch's gradient touches only the rows of its own tokens.
EMBEDDINGS = "embeddings"
# The task head: everything between the encoder's last hidden states and the
# logits. BERT's pooler (dense + tanh on [CLS]) is the counterpart of RoBERTa's
# head dense layer (inside "classifier"), so it trains with the head in the
# lora and bias modes.
HEAD_NAMES = ("pooler", "classifier")
# What finetune="head" trains: the classifier alone (a private linear probe).
CLASSIFIER = "classifier"
LORA_LEAVES = ("lora_a", "lora_b")
LORA_SCALE = "lora_scale"

_LAYER_RE = re.compile(r"^layer_(\d+)$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on dense modules: ``y = x @ W + b + (alpha / rank) * (x @ A) @ B``
    with ``A`` (in, rank) and ``B`` (rank, out).

    ``targets`` name dense modules inside each transformer layer: one of
    ``LAYER_DENSE_MODULES`` or a dotted suffix of one (``"query"`` matches
    ``attention.query``; ``"output"`` matches both ``attention.output`` and the
    feed-forward ``output``; ``"attention.output"`` only the former), or
    ``"all"``: every dense matrix of the layer (stored as ``LAYER_DENSE_MODULES``).
    ``A`` starts uniform in +-1/sqrt(fan_in) (PEFT's Kaiming-uniform), ``B`` at 0,
    so the adapted model equals the base model at initialisation. ``dropout``
    applies to the adapter's input (stream ``"dropout"``).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if ALL_TARGETS in targets:
            targets = LAYER_DENSE_MODULES
        object.__setattr__(self, "targets", targets)
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ValueError("LoRA targets is empty")
        for t in self.targets:
            if not any(_matches(m, t) for m in LAYER_DENSE_MODULES):
                raise ValueError(
                    f"LoRA target {t!r} matches no dense module; the modules in "
                    f"each layer are {', '.join(LAYER_DENSE_MODULES)}"
                )

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    def matches(self, module_path: str) -> bool:
        """Whether the in-layer module (e.g. ``"attention.query"``) is adapted."""
        return any(_matches(module_path, t) for t in self.targets)


def _matches(module_path: str, target: str) -> bool:
    return module_path == target or module_path.endswith("." + target)


# ----------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------


def _as_path(path: Any) -> tuple[str, ...]:
    if isinstance(path, str):
        return tuple(p for p in re.split(r"[/.]", path) if p)
    return tuple(key_name(k) for k in path)


def layer_and_matrix(path) -> tuple[int | None, str]:
    """Split a parameter path into (transformer layer index or None, matrix name).

    ``("encoder", "layer_3", "attention", "query", "lora_a")`` gives
    ``(3, "attention.query.lora_a")``; ``("classifier", "kernel")`` gives
    ``(None, "classifier.kernel")``; ``("embeddings", "word_embeddings",
    "embedding")`` gives ``(None, "embeddings.word_embeddings.embedding")``.
    Accepts tuples of strings, jax key paths (``DictKey`` entries), or a
    ``"/"``- or ``"."``-separated string.
    """
    parts = _as_path(path)
    for i, p in enumerate(parts):
        m = _LAYER_RE.match(p)
        if m:
            return int(m.group(1)), ".".join(parts[i + 1:])
    return None, ".".join(parts)


# ----------------------------------------------------------------------------
# Nested-dict helpers (params are plain nested dicts of arrays)
# ----------------------------------------------------------------------------


def _unfreeze(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree


def flatten_params(params: Mapping) -> dict[tuple[str, ...], Any]:
    """``{path tuple: leaf}`` for a nested dict of arrays."""
    out: dict[tuple[str, ...], Any] = {}

    def rec(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                rec(v, prefix + (k,))
        else:
            out[prefix] = node

    rec(params, ())
    return out


def unflatten_params(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _is_trainable(path: tuple[str, ...], finetune: str) -> bool:
    leaf = path[-1]
    if leaf == LORA_SCALE:
        return False
    if finetune == "full":
        return True
    if finetune == "frozen_embeddings":
        return path[0] != EMBEDDINGS
    if finetune == "head":
        # BERT's pooler stays frozen: a linear probe on the pretrained pooled
        # vector. RoBERTa's "classifier" holds a dense layer before out_proj, so
        # there head-only training trains a 2-layer head.
        return path[0] == CLASSIFIER
    if path[0] in HEAD_NAMES:
        return True
    if finetune == "lora":
        return leaf in LORA_LEAVES
    # bias (BitFit): every bias, including LayerNorm shifts.
    return leaf == "bias"


def partition(params: Mapping, finetune: str) -> tuple[dict, dict]:
    """Split params into ``(trainable, frozen)`` nested dicts.

    Each holds only its own leaves (empty branches dropped), so
    ``jax.grad(loss)(trainable, frozen, ...)`` differentiates - and a per-example
    ``vmap`` materialises - only the trainable leaves. ``combine`` inverts it.

    - ``"full"``: every parameter (LoRA factors too, if present);
    - ``"frozen_embeddings"``: every parameter but the embedding layer's
      (word, position and token-type tables, embedding LayerNorm);
    - ``"lora"``: ``lora_a``/``lora_b`` plus the classification head
      (BERT: ``pooler`` and ``classifier``; RoBERTa: ``classifier``, which
      holds its dense and projection layers);
    - ``"bias"``: every ``bias`` leaf (dense and LayerNorm, as in BitFit) plus
      the classification head;
    - ``"head"``: ``classifier`` only (BERT: the final linear layer, pooler
      frozen; RoBERTa: its dense and projection layers).

    ``lora_scale`` constants are always frozen.
    """
    if finetune not in FINETUNE_MODES:
        raise ValueError(
            f"unknown finetune mode {finetune!r}; choose one of {', '.join(FINETUNE_MODES)}"
        )
    flat = flatten_params(params)
    if finetune == "lora" and not any(p[-1] in LORA_LEAVES for p in flat):
        raise ValueError(
            "finetune='lora' but the parameters hold no LoRA factors; build the "
            "model with lora=LoraConfig(...)"
        )
    trainable = {p: v for p, v in flat.items() if _is_trainable(p, finetune)}
    frozen = {p: v for p, v in flat.items() if p not in trainable}
    return unflatten_params(trainable), unflatten_params(frozen)


def combine(trainable: Mapping, frozen: Mapping) -> dict:
    """Merge the two halves of ``partition`` back into one params tree."""

    def rec(a, b, prefix):
        out = {}
        for k in set(a) | set(b):
            if k in a and k in b:
                va, vb = a[k], b[k]
                if isinstance(va, Mapping) and isinstance(vb, Mapping):
                    out[k] = rec(va, vb, prefix + (k,))
                else:
                    raise ValueError(
                        f"parameter {'/'.join(prefix + (k,))} is in both trees"
                    )
            else:
                out[k] = a[k] if k in a else b[k]
        return out

    return rec(_unfreeze(trainable), _unfreeze(frozen), ())


def merge_lora(params: Mapping) -> dict:
    """Fold each adapter into its kernel, ``W + (alpha/r) A B``, and drop the
    LoRA leaves; the result is the parameter tree of the same model without
    LoRA (``from_config(..., lora=None)``)."""

    def rec(node):
        if not isinstance(node, Mapping):
            return node
        if "lora_a" in node and "lora_b" in node:
            a, b = node["lora_a"], node["lora_b"]
            scale = node.get(LORA_SCALE)
            if scale is None:
                raise ValueError("LoRA factors without a lora_scale leaf")
            out = {k: v for k, v in node.items() if k not in LORA_LEAVES + (LORA_SCALE,)}
            kernel = node["kernel"]
            delta = jnp.asarray(scale, jnp.float32) * (
                jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32)
            )
            merged = jnp.asarray(kernel, jnp.float32) + delta
            out["kernel"] = merged.astype(jnp.asarray(kernel).dtype)
            return out
        return {k: rec(v) for k, v in node.items()}

    return rec(params)


def count_params(params: Mapping) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))
