"""Encoder configuration read from Hugging Face ``config.json`` fields.

This module imports neither JAX nor transformers, so the data pipeline can use
it (``anadp.data.check_max_length``) without pulling in the model code.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
# The model_type `python -m anadp.export` gives a mean-pooled BERT classifier: the
# folder ships its own PyTorch class, and a type transformers does not know makes
# it refuse the folder without trust_remote_code instead of silently building
# BertForSequenceClassification (a [CLS] pooler). Read here as a BERT encoder.
MEAN_POOLED_BERT_TYPE = "anadp_bert_mean"

# Activation names accepted in ``hidden_act`` (Hugging Face's ``ACT2FN`` keys we
# implement; see ``anadp.models.modeling.activation``).
SUPPORTED_ACTIVATIONS = (
    "gelu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "quick_gelu",
    "relu",
    "silu",
    "swish",
    "tanh",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The fields of a HF BERT/RoBERTa ``config.json`` that shape the encoder.

    Frozen (hashable), so it can be an attribute of a Flax module.
    """

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    classifier_dropout: float | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: "
                f"{', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        """Longest input the position table allows.

        RoBERTa numbers positions from ``pad_token_id + 1`` (fairseq convention),
        so ``pad_token_id + 1`` rows of its table are unusable: roberta-base has
        514 rows and takes 512 tokens.
        """
        if self.model_type == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @property
    def head_dropout(self) -> float:
        if self.classifier_dropout is not None:
            return float(self.classifier_dropout)
        return float(self.hidden_dropout_prob)

    @classmethod
    def from_hf(cls, config: Any) -> ModelConfig:
        """From a HF config: a dict, a ``PretrainedConfig``, a path to a
        ``config.json`` (or its folder), or a ``ModelConfig`` (returned as is)."""
        if isinstance(config, ModelConfig):
            return config
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        elif hasattr(config, "to_dict"):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise TypeError(
                "expected a HF config dict, a transformers PretrainedConfig, a "
                f"path to config.json or a ModelConfig, got {type(config).__name__}"
            )
        d = dict(config)
        model_type = d.get("model_type")
        if model_type is None:
            archs = " ".join(d.get("architectures") or ()).lower()
            model_type = "roberta" if "roberta" in archs else "bert"
        if model_type == MEAN_POOLED_BERT_TYPE:
            model_type = "bert"
        position_type = d.get("position_embedding_type", "absolute") or "absolute"
        if position_type != "absolute":
            raise ValueError(
                f"position_embedding_type={position_type!r} is not supported "
                "(only 'absolute')"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        if model_type == "roberta":
            defaults.update(
                vocab_size=50265,
                max_position_embeddings=514,
                type_vocab_size=1,
                layer_norm_eps=1e-5,
                pad_token_id=1,
            )
        kwargs = {}
        for name, default in defaults.items():
            if name == "model_type":
                continue
            value = d.get(name, default)
            if value is None and name != "classifier_dropout":
                value = default
            kwargs[name] = value
        return cls(model_type=model_type, **kwargs)


def check_max_length(max_length: int, model_config: Any) -> int:
    """``max_length`` if the model can take sequences that long, else ValueError.

    ``model_config``: a model (anything with ``.config``), a ``ModelConfig``, a HF
    config dict / ``PretrainedConfig``, or a path to ``config.json``.
    """
    ok = isinstance(max_length, int) and not isinstance(max_length, bool)
    if not ok and hasattr(max_length, "__index__") and not isinstance(max_length, bool):
        ok, max_length = True, int(max_length)
    if not ok or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    cfg = getattr(model_config, "config", model_config)
    cfg = ModelConfig.from_hf(cfg)
    limit = cfg.max_sequence_length
    if max_length > limit:
        detail = f"max_position_embeddings={cfg.max_position_embeddings}"
        if cfg.model_type == "roberta":
            detail += (f", of which {cfg.pad_token_id + 1} are reserved by RoBERTa's "
                       f"padding-offset positions (pad_token_id={cfg.pad_token_id})")
        raise ValueError(
            f"max_length={max_length} exceeds the model's {limit} positions ({detail}); "
            f"use max_length <= {limit}"
        )
    return max_length


def roberta_base_config() -> dict:
    """The roberta-base shapes as a HF config dict (for random-weight benchmarks)."""
    return {
        "model_type": "roberta",
        "architectures": ["RobertaForMaskedLM"],
        "vocab_size": 50265,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "layer_norm_eps": 1e-5,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
    }


def minilm_l6_config() -> dict:
    """The MiniLM-L6-H384 shapes (``minilm-l6``'s config.json) as a HF config dict,
    for random-weight benchmarks on machines without the checkpoint package."""
    return {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "vocab_size": 30522,
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
    }


def tiny_bert_config(vocab_size: int = 30522) -> dict:
    """The ``tiny-bert`` shapes: 2 layers, hidden 32, 2 heads, intermediate 64,
    128 positions, MiniLM's (bert-base-uncased) vocabulary."""
    return {
        "model_type": "bert",
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 128,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
    }
