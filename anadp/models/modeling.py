"""BERT and RoBERTa encoders with sequence-classification heads, in Flax linen.

Written from the architecture as Hugging Face's PyTorch ``BertModel`` /
``RobertaModel`` compute it (post-LayerNorm transformer, absolute position
embeddings), driven by ``ModelConfig`` (the ``config.json`` fields).

Parameter tree (names matter: per-layer grouping and plots rely on them)::

    embeddings/{word_embeddings, position_embeddings, token_type_embeddings}/embedding
    embeddings/norm/{scale, bias}
    encoder/layer_<i>/attention/{query, key, value, output}/{kernel, bias[, lora_a, lora_b, lora_scale]}
    encoder/layer_<i>/attention/norm/{scale, bias}
    encoder/layer_<i>/{intermediate, output}/{kernel, bias[, lora_*]}
    encoder/layer_<i>/norm/{scale, bias}
    pooler/{kernel, bias}                                  (BERT, pooling="cls" only)
    classifier/{kernel, bias}                              (BERT: pooled -> dropout -> linear)
    classifier/{dense, out_proj}/{kernel, bias}            (RoBERTa: first token -> dropout ->
                                                            dense -> tanh -> dropout -> out_proj)

Dense kernels are (in, out), i.e. the transpose of PyTorch's Linear weight.

BERT's pooled vector is ``pooling="cls"``: HF's pooler, ``tanh(W h[CLS] + b)``;
or ``pooling="mean"``: the mean of the real tokens' last hidden states (the
sentence-transformers convention), with no pooler parameters at all. RoBERTa
keeps its own head. ``head_init="zeros"`` starts the final classifier Dense
at zero (under DP a random head is noise the private steps must undo).

Mixed precision (``dtype``, the Flax convention): the parameters are float32
whatever the model's ``dtype``; with ``dtype=jnp.bfloat16`` every module casts
its parameters and input to bfloat16 at use, so activations and matrix
products are bfloat16, while LayerNorm statistics, attention softmax, mean
pooling and the logits stay float32 (see each for why). Gradients with
respect to the float32 parameters are float32 (of bfloat16-rounded values),
so the optimiser and the clipping see float32 either way.

Nothing here inspects the batch size, so a per-example function that adds a
batch axis of 1 inside can be ``jax.vmap``-ed over examples.

Ghost-clipping hooks (``anadp.ghost``): every module that owns trainable
parameters records what its parameter gradients are made of, and nothing else
changes. It sows its input into the ``"intermediates"`` collection and passes
its output through ``self.perturb`` (collection ``"perturbations"``): Dense
sows ``dense_in`` (x) and perturbs ``dense_out`` (y), and with LoRA also sows
and perturbs ``lora_z`` / ``lora_z_out`` (z = x @ lora_a); LayerNorm sows
``norm_xhat`` (the normalised input) and perturbs ``norm_out``; Embed sows
``embed_ids`` and perturbs ``embed_out``. Both are inert unless the
collections are requested (``mutable=["intermediates"]``, a
``"perturbations"`` entry in the variables): outputs and parameter names are
unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from .config import ModelConfig
from .lora import LORA_SCALE, LoraConfig

# Collections and names of the ghost-clipping hooks (see the module docstring).
RECORD = "intermediates"
PERTURB = "perturbations"
DENSE_IN, DENSE_OUT = "dense_in", "dense_out"
LORA_Z, LORA_Z_OUT = "lora_z", "lora_z_out"
NORM_XHAT, NORM_OUT = "norm_xhat", "norm_out"
EMBED_IDS, EMBED_OUT = "embed_ids", "embed_out"

# What BERT's classifier reads (see the module docstring); "auto" is resolved
# from the checkpoint by ``loading.resolve_pooling`` before a model is built.
POOLINGS = ("cls", "mean")
# How the final classifier Dense starts: N(0, initializer_range), or zeros.
HEAD_INITS = ("normal", "zeros")
# What a model may compute in (``EncoderClassifier.dtype``); parameters stay float32.
COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The computation dtype for a name (``"float32"``, ``"bfloat16"``) or a dtype;
    ValueError for any other."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in COMPUTE_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {COMPUTE_DTYPES}")
    return resolved


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Hugging Face ``ACT2FN`` semantics for the names we support."""
    if name == "gelu":  # exact (erf) GELU, as torch.nn.functional.gelu
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu_fast":
        return lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "relu":
        return jax.nn.relu
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "tanh":
        return jnp.tanh
    raise ValueError(f"unsupported activation {name!r}")


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


# PEFT initialises A (r, in) with kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(in)).
_lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Dense(nn.Module):
    """``x @ kernel + bias``, plus a LoRA adapter when ``lora`` is set."""

    features: int
    init_std: float = 0.02
    lora: LoraConfig | None = None
    dtype: Any = jnp.float32  # computation; the parameters are float32, cast at use

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        in_features = x.shape[-1]
        kernel = self.param("kernel", _normal(self.init_std), (in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        # The input as the product uses it: that is what the ghost engine must record.
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        self.sow(RECORD, DENSE_IN, x)
        y = jnp.dot(x, kernel) + bias
        if self.lora is not None:
            r = self.lora.rank
            a = self.param("lora_a", _lora_a_init, (in_features, r))
            b = self.param("lora_b", nn.initializers.zeros_init(), (r, self.features))
            scale = self.param(
                LORA_SCALE, lambda _: jnp.asarray(self.lora.scale, jnp.float32)
            )
            a, b, scale = promote_dtype(a, b, scale, dtype=self.dtype)
            h = x
            if self.lora.dropout > 0.0:
                h = nn.Dropout(self.lora.dropout, name="lora_dropout")(
                    h, deterministic=deterministic
                )
            z = jnp.dot(h, a)
            self.sow(RECORD, LORA_Z, z)
            z = self.perturb(LORA_Z_OUT, z, collection=PERTURB)
            y = y + jnp.dot(z, b) * scale
        return self.perturb(DENSE_OUT, y, collection=PERTURB)


class LayerNorm(nn.Module):
    """``nn.LayerNorm(use_fast_variance=False)`` over the last axis, with the same
    parameters (``scale``, ``bias``) and the same floating-point operations,
    plus the ghost-clipping hooks (the normalised input is only computed when
    it is recorded).

    Statistics, normalisation and the affine map are float32 whatever ``dtype``
    (only the output is cast to it): a variance over hundreds of features summed
    in bfloat16 (8-bit mantissa) loses most of its digits, and the residual
    stream it normalises is where bfloat16 rounding accumulates."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32  # of the output; parameters float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (features,))
        bias = self.param("bias", nn.initializers.zeros_init(), (features,))
        stats = jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))
        mean = stats.mean(-1)
        var = jnp.expand_dims(
            jax.lax.square(stats - jnp.expand_dims(mean, -1)).mean(-1), -1
        )
        mean = jnp.expand_dims(mean, -1)
        centred = x - mean
        inv = jax.lax.rsqrt(var + self.epsilon)
        if self.is_mutable_collection(RECORD):
            self.sow(RECORD, NORM_XHAT, centred * inv)
        y = centred * (inv * scale) + bias
        y = jnp.asarray(y, self.dtype)
        return self.perturb(NORM_OUT, y, collection=PERTURB)


class Embed(nn.Embed):
    """``nn.Embed`` (same parameter, same lookup) plus the ghost-clipping hooks.

    The rows are looked up in the table's own float32 and then cast to ``dtype``
    (``nn.Embed`` casts the whole table first): the gradient then scatter-adds
    the tokens' cotangents into the table in float32, where bfloat16 would
    accumulate hundreds of tokens into one row (the token types) with an 8-bit
    mantissa; and no bfloat16 copy of a large vocabulary is made each step."""

    def __call__(self, inputs):
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        self.sow(RECORD, EMBED_IDS, inputs)
        if self.num_embeddings == 1:  # as nn.Embed: its single row, whatever the ids
            rows = jnp.broadcast_to(self.embedding, inputs.shape + (self.features,))
        else:
            rows = jnp.take(self.embedding, inputs, axis=0)
        return self.perturb(EMBED_OUT, jnp.asarray(rows, self.dtype), collection=PERTURB)


def _layer_norm(config: ModelConfig, name: str, dtype: Any) -> LayerNorm:
    # Two-pass variance, as PyTorch computes it (the fast E[x^2]-E[x]^2 form
    # costs ~1e-5 of agreement with the reference).
    return LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, name=name)


class Embeddings(nn.Module):
    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic: bool = True):
        cfg = self.config
        init = _normal(cfg.initializer_range)
        if cfg.model_type == "roberta":
            # fairseq positions: pad_token_id + 1, +2, ... over non-pad tokens;
            # pad tokens get pad_token_id.
            not_pad = (input_ids != cfg.pad_token_id).astype(jnp.int32)
            position_ids = jnp.cumsum(not_pad, axis=-1) * not_pad + cfg.pad_token_id
        else:
            position_ids = jnp.broadcast_to(
                jnp.arange(input_ids.shape[-1], dtype=jnp.int32), input_ids.shape
            )
        words = Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                      name="word_embeddings")(input_ids)
        positions = Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                          dtype=self.dtype, name="position_embeddings")(position_ids)
        types = Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                      name="token_type_embeddings")(token_type_ids)
        x = words + types + positions
        x = _layer_norm(cfg, "norm", self.dtype)(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


def _lora_for(lora: LoraConfig | None, module_path: str) -> LoraConfig | None:
    return lora if lora is not None and lora.matches(module_path) else None


class Attention(nn.Module):
    config: ModelConfig
    lora: LoraConfig | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        cfg = self.config
        std = cfg.initializer_range
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        def proj(name):
            dense = Dense(cfg.hidden_size, std, _lora_for(self.lora, f"attention.{name}"),
                          dtype=self.dtype, name=name)
            y = dense(x, deterministic)
            return y.reshape(y.shape[:-1] + (heads, head_dim))

        q, k, v = proj("query"), proj("key"), proj("value")
        # Scores and softmax in float32 whatever the dtype: bfloat16 would round
        # the logits by up to 0.4% before exp amplifies the error, and sum a
        # row of up to T probabilities with an 8-bit mantissa.
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / math.sqrt(head_dim)
        # mask: [..., T] with 1 for real tokens -> broadcast over heads and queries.
        keep = (mask > 0)[..., None, None, :]
        scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        ctx = jnp.einsum("...hqk,...khd->...qhd", jnp.asarray(probs, self.dtype), v)
        ctx = ctx.reshape(ctx.shape[:-2] + (cfg.hidden_size,))
        out = Dense(cfg.hidden_size, std, _lora_for(self.lora, "attention.output"),
                    dtype=self.dtype, name="output")(ctx, deterministic)
        out = nn.Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic)
        return _layer_norm(cfg, "norm", self.dtype)(out + x)


class TransformerLayer(nn.Module):
    config: ModelConfig
    lora: LoraConfig | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        cfg = self.config
        std = cfg.initializer_range
        h = Attention(cfg, self.lora, self.dtype, name="attention")(x, mask, deterministic)
        inter = Dense(cfg.intermediate_size, std, _lora_for(self.lora, "intermediate"),
                      dtype=self.dtype, name="intermediate")(h, deterministic)
        inter = activation(cfg.hidden_act)(inter)
        out = Dense(cfg.hidden_size, std, _lora_for(self.lora, "output"),
                    dtype=self.dtype, name="output")(inter, deterministic)
        out = nn.Dropout(cfg.hidden_dropout_prob)(out, deterministic=deterministic)
        return _layer_norm(cfg, "norm", self.dtype)(out + h)


class Encoder(nn.Module):
    config: ModelConfig
    lora: LoraConfig | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        for i in range(self.config.num_hidden_layers):
            layer = TransformerLayer(self.config, self.lora, self.dtype, name=f"layer_{i}")
            x = layer(x, mask, deterministic)
        return x


def masked_mean(hidden, attention_mask):
    """Mean over the tokens whose mask is 1: ``[..., T, F]``, ``[..., T]`` -> ``[..., F]``.

    As sentence-transformers' mean pooling computes it: padding positions are
    multiplied by 0 and the count is clamped at 1e-9 (an all-padding row gives 0).
    Parameter-free, so the ghost engine needs no hook for it. Summed in float32
    (a sum of up to T bfloat16 terms would keep 8 bits of mantissa), returned in
    ``hidden``'s dtype.
    """
    wide = jnp.promote_types(hidden.dtype, jnp.float32)
    mask = jnp.asarray(attention_mask, wide)[..., None]
    count = jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)
    mean = jnp.sum(jnp.asarray(hidden, wide) * mask, axis=-2) / count
    return jnp.asarray(mean, hidden.dtype)


def output_layer_path(model_type: str) -> tuple[str, ...]:
    """Module path of the Dense that gives the logits (the one ``head_init`` sets)."""
    return ("classifier",) if model_type == "bert" else ("classifier", "out_proj")


def _check_head_options(config: ModelConfig, pooling: str, head_init: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not one of {POOLINGS}")
    if pooling == "mean" and config.model_type != "bert":
        raise ValueError(
            "pooling='mean' is for BERT models only: RoBERTa keeps its own classification "
            "head (dense -> tanh -> out_proj on <s>); use pooling='cls'"
        )
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init={head_init!r} is not one of {HEAD_INITS}")


def _head_init_std(config: ModelConfig, head_init: str) -> float:
    # N(0, 0) is the zero initialiser; the bias starts at zero either way.
    return 0.0 if head_init == "zeros" else config.initializer_range


class RobertaHead(nn.Module):
    config: ModelConfig
    num_labels: int
    out_init_std: float = 0.02
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden, deterministic: bool = True):
        cfg = self.config
        drop = nn.Dropout(cfg.head_dropout)
        x = drop(hidden[..., 0, :], deterministic=deterministic)
        x = jnp.tanh(Dense(cfg.hidden_size, cfg.initializer_range, dtype=self.dtype, name="dense")(x))
        x = drop(x, deterministic=deterministic)
        return Dense(self.num_labels, self.out_init_std, dtype=self.dtype, name="out_proj")(x)


class EncoderClassifier(nn.Module):
    """A BERT/RoBERTa encoder with HF's sequence-classification head.

    ``apply({"params": p}, input_ids, attention_mask, token_type_ids=None,
    deterministic=True)`` gives logits ``[..., num_labels]``;
    ``method=model.encode`` gives the last hidden states ``[..., T, hidden]``.
    Dropout (when ``deterministic=False``) draws from the ``"dropout"`` RNG
    stream: ``apply(..., rngs={"dropout": key})``.

    ``pooling`` (BERT only) and ``head_init``: see the module docstring; a
    ``pooling="mean"`` model has no ``pooler`` parameters.
    ``dtype``: what the model computes in (``COMPUTE_DTYPES``; see the module
    docstring); the parameters are float32 and the logits float32 either way.
    ``load_report`` is set by ``from_pretrained`` (missing/unexpected keys).
    """

    config: ModelConfig
    num_labels: int
    lora: LoraConfig | None = None
    pooling: str = "cls"
    head_init: str = "normal"
    dtype: Any = jnp.float32
    load_report: Any = dataclasses.field(default=None, compare=False, hash=False)

    def __post_init__(self):
        _check_head_options(self.config, self.pooling, self.head_init)
        compute_dtype(self.dtype)
        super().__post_init__()

    def setup(self):
        cfg = self.config
        dtype = self.dtype
        self.embeddings = Embeddings(cfg, dtype)
        self.encoder = Encoder(cfg, self.lora, dtype)
        out_std = _head_init_std(cfg, self.head_init)
        if cfg.model_type == "bert":
            if self.pooling == "cls":
                self.pooler = Dense(cfg.hidden_size, cfg.initializer_range, dtype=dtype)
            self.head_dropout = nn.Dropout(cfg.head_dropout)
            self.classifier = Dense(self.num_labels, out_std, dtype=dtype)
        else:
            self.classifier = RobertaHead(cfg, self.num_labels, out_std, dtype)

    def encode(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        input_ids = jnp.asarray(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        return self.encoder(x, jnp.asarray(attention_mask), deterministic)

    def pool(self, hidden, attention_mask):
        """The vector BERT's classifier reads, from last hidden states ``[..., T, hidden]``:
        the pooler output ``tanh(W h[CLS] + b)`` (``pooling="cls"``) or the mean
        of the real tokens' states (``pooling="mean"``)."""
        if self.config.model_type != "bert":
            raise ValueError("pool() is defined for BERT models only (RoBERTa has no pooler)")
        if self.pooling == "mean":
            return masked_mean(hidden, attention_mask)
        return jnp.tanh(self.pooler(hidden[..., 0, :]))

    def head(self, hidden, attention_mask, deterministic: bool = True):
        """Float32 logits from last hidden states ``[..., T, hidden]`` and the
        attention mask ``[..., T]`` (the task head alone). Float32 whatever the
        dtype: the cross-entropy's log-sum-exp and the metrics read them, and
        bfloat16 logits would round the loss (and its gradient) by up to 0.4%."""
        if self.config.model_type == "bert":
            pooled = self.pool(hidden, attention_mask)
            pooled = self.head_dropout(pooled, deterministic=deterministic)
            return _f32(self.classifier(pooled))
        return _f32(self.classifier(hidden, deterministic))

    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        h = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
        return self.head(h, attention_mask, deterministic)
