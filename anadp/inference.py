"""A trained run as a model: rebuild it from its workdir, and compute logits for texts.

    model, params, tokenizer, labels = load_run("runs/default")
    logits = predict_logits(model, params, tokenizer, ["a fine film"], max_length=64)

A workdir's checkpoints hold only the trainable part of the params (plus
optimiser and mechanism state); the frozen part is rebuilt from `model.name`
and `train.seed` exactly as `train.run` built it (`task_and_model.build_model`). Only
the trainable params are read from the checkpoint, never its secrets
(docs/privacy.md: a checkpoint is secret material; what this returns is not).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from anadp import checkpoint, models
from anadp.data.loading import encode_texts
from anadp.task_and_model import build_model
from anadp.workdir import LABELS_FILE


class LoadedRun(NamedTuple):
    model: Any  # models.EncoderClassifier
    params: dict
    tokenizer: Any
    labels: list[str]


def read_run_config(workdir: str | os.PathLike) -> dict:
    """The resolved config a run wrote (its config.json), as a dict."""
    path = os.path.join(os.fspath(workdir), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {os.fspath(workdir)!r} is not a training workdir")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_summary(workdir: str | os.PathLike) -> dict | None:
    """The run's summary.json (written when training finished), or None."""
    path = os.path.join(os.fspath(workdir), "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_labels(workdir: str | os.PathLike, config: Mapping) -> list[str]:
    """Label names by class id: the workdir's labels.json (written by runs on user
    data), else the registered task's label names."""
    path = os.path.join(os.fspath(workdir), LABELS_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            labels = json.load(f)
        if not isinstance(labels, list) or not labels:
            raise ValueError(f"{path} must hold a non-empty JSON list of label names")
        return [str(x) for x in labels]
    from anadp.data import get_task

    return list(get_task(config["data"]["task"]).label_names)


def text_columns(config: Mapping) -> tuple[str, ...]:
    """The input column(s) a run was trained on: `data.text_column` (and
    `data.text_pair_column`, if set) for runs on user data, else the task's text fields."""
    data = config["data"]
    if data.get("text_column"):
        pair = data.get("text_pair_column")
        return (data["text_column"], pair) if pair else (data["text_column"],)
    from anadp.data import get_task

    return tuple(get_task(data["task"]).text_fields)


def load_run(workdir: str | os.PathLike, merge: bool = True, step: int | None = None) -> LoadedRun:
    """(model, params, tokenizer, labels) of a trained run, from its latest checkpoint
    (or `step`).

    The model is rebuilt with the run's name, number of labels, LoRA config,
    pooling, head init and seed; the checkpoint's trainable params replace the
    initial ones. With `merge` (the default) LoRA adapters are folded into their
    kernels and the model is returned without LoRA (the same function, a plain
    BERT/RoBERTa tree); `merge=False` keeps the adapters.
    """
    workdir = os.fspath(workdir)
    config = read_run_config(workdir)
    labels = run_labels(workdir, config)
    model, initial = build_model(config, len(labels))
    initial_trainable, frozen = models.partition(initial, config["model"]["finetune"])
    _, trainable = checkpoint.load_trainable(workdir, initial_trainable, step)
    params = models.combine(jax.tree_util.tree_map(np.asarray, trainable), frozen)
    if merge and model.lora is not None:
        params, model = models.merge_lora(params), model.clone(lora=None)
    return LoadedRun(model, params, models.tokenizer(config["model"]["name"]), labels)


def encode(tokenizer, texts: Sequence[str], text_pairs: Sequence[str] | None, max_length: int) -> dict:
    """Token arrays for texts (and their pairs), tokenised as the training data are
    (anadp.data.loading: `tokenizer(first[, second])`, padded to max_length, truncated,
    str() of each value)."""
    return encode_texts(tokenizer, [texts] if text_pairs is None else [texts, text_pairs], max_length)


def _pad_rows(arrays: dict, rows: int) -> dict:
    """Pads every array to `rows` rows with zeros (an all-zero mask), so that every
    batch has one shape and compiles once."""
    return {k: np.pad(v, [(0, rows - len(v))] + [(0, 0)] * (v.ndim - 1)) for k, v in arrays.items()}


def predict_logits(
    model,
    params: Mapping,
    tokenizer,
    texts: Sequence[str],
    text_pairs: Sequence[str] | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Logits float32 [len(texts), num_labels] of the model in evaluation mode.

    `max_length`: pass the run's `data.max_length` to truncate as training did;
    None: the longest input the model and the tokenizer take.
    """
    if max_length is None:
        max_length = min(model.config.max_sequence_length, int(tokenizer.model_max_length))
    models.check_max_length(max_length, model.config)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(text_pairs)} text pairs")
    apply = jax.jit(lambda p, b: model.apply(
        {"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"], deterministic=True))
    out = [np.zeros((0, model.num_labels), np.float32)]
    for start in range(0, len(texts), batch_size):
        stop = min(start + batch_size, len(texts))
        pairs = None if text_pairs is None else text_pairs[start:stop]
        batch = _pad_rows(encode(tokenizer, texts[start:stop], pairs, max_length), batch_size)
        out.append(np.asarray(apply(params, batch), np.float32)[: stop - start])
    return np.concatenate(out)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits (in float64, rows summing to 1)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def run_cli(action: Callable[[], str]) -> int:
    """The end of a command line (predict, export): runs `action` and prints the line it
    returns (exit status 0), or a bad input's error in one line (exit status 2)."""
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only managers
    try:
        message = action()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(message)
    return 0
