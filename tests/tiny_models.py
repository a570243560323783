"""Tiny random BERT / RoBERTa models and batches shared by the clipping-engine tests
(test_ghost.py, test_mixed_precision.py)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import anadp.models as M

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@functools.cache
def tiny_model(kind: str, finetune: str, layers: int = 1, pooling: str = "cls", dtype: str = "float32"):
    """A random model (1 layer unless asked: compilation is most of these tests'
    time), LoRA on every dense module for full and lora fine-tuning (full then
    trains kernels and LoRA factors together); every parameter is jittered so
    that LoRA's B and the biases are not zero. `dtype`: what the model computes
    in (the parameters are float32)."""
    lora = M.LoraConfig(rank=2, alpha=3.0, targets=M.LAYER_DENSE_MODULES) if finetune in ("full", "lora") else None
    if kind == "bert":
        config = M.tiny_bert_config(vocab_size=40)
    else:
        with open(os.path.join(FIXTURES, "tiny-roberta", "config.json")) as f:
            config = json.load(f)
    config = dict(config, num_hidden_layers=layers)
    model, params = M.from_config(config, 3, lora=lora, seed=0, pooling=pooling, dtype=dtype)
    rng = np.random.default_rng(1)
    jitter = lambda x: x + np.float32(0.05) * rng.standard_normal(x.shape, np.float32) if x.ndim else x  # noqa: E731
    return model, jax.tree_util.tree_map(lambda x: jnp.asarray(jitter(np.asarray(x))), params)


def tiny_batch(kind: str, rows: int = 8, length: int = 12, vocab: int = 40) -> dict:
    """Padding (a 0 attention mask) in some rows, repeated tokens, two token
    types for BERT; RoBERTa pads with its pad id, so padding positions repeat."""
    rng = np.random.default_rng(0)
    pad = 0 if kind == "bert" else 1
    ids = rng.integers(3, vocab, size=(rows, length)).astype(np.int32)
    ids[-1, -1] = ids[-1, 1]  # a repeated word in one example
    attention = np.ones_like(ids)
    attention[-1, length // 2:] = 0
    attention[0, 3:] = 0
    ids = np.where(attention > 0, ids, pad)
    types = np.zeros_like(ids)
    if kind == "bert":
        types[:, 6:] = 1
        types = types * attention
    labels = rng.integers(0, 3, size=rows).astype(np.int32)
    return {"input_ids": ids, "attention_mask": attention, "token_type_ids": types, "labels": labels}
