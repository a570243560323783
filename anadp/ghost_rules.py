"""The per-module rules of the ghost-norm engine (`anadp.ghost`, whose docstring
has the mathematics): from one microbatch's records and output cotangents, each
example's squared gradient norm of every trainable leaf of a Dense (with LoRA),
LayerNorm or Embed module, and the book-kept clipped sums for given clip
factors. Every contraction at full float32 (`_einsum`), every record and
cotangent cast to float32 (`_f32`) first, dropped rows selected to exactly 0
(`_kept`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from anadp import clipping as clipping_lib
from anadp.models import modeling
from anadp.models.lora import LORA_SCALE

# Hook (perturbation name of the module's output) -> the parameter leaves the
# engine knows how to differentiate for a module with that hook.
LEAVES_BY_HOOK = {
    modeling.DENSE_OUT: ("kernel", "bias", "lora_a", "lora_b"),
    modeling.NORM_OUT: ("scale", "bias"),
    modeling.EMBED_OUT: ("embedding",),
}


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
    """Every contraction of the engine: float32 out, full float32 passes (TF32
    would round norms and sums differently: `clipping.FULL_FLOAT32`)."""
    return jnp.einsum(
        spec, *operands, precision=clipping_lib.FULL_FLOAT32, preferred_element_type=jnp.float32
    )


def _tokens(x: jax.Array) -> jax.Array:
    """[B, ..., F] -> [B, T, F] (T = 1 for [B, F])."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _use_gram(tokens: int, m: int, n: int, kernel_norm: str) -> bool:
    if kernel_norm == "auto":
        return tokens * (m + n) < m * n
    return kernel_norm == "gram"


class Grams:
    """Per-example Gram matrices A_i A_i^T [B, T, T] of recorded arrays [B, ..., F],
    computed once per array: the query, key and value projections record the
    same input object, so its Gram matrix serves all three (and LoRA's A)."""

    def __init__(self):
        self._cache: dict[int, tuple[jax.Array, jax.Array]] = {}

    def __call__(self, a: jax.Array) -> jax.Array:
        hit = self._cache.get(id(a))
        if hit is None or hit[0] is not a:
            t = _f32(_tokens(a))
            hit = (a, _einsum("btf,bsf->bts", t, t))
            self._cache[id(a)] = hit
        return hit[1]


def _product_sq_norms(a: jax.Array, d: jax.Array, grams: Grams, kernel_norm: str) -> jax.Array:
    """``||a_i^T d_i||_F^2`` for every example i; a: [B, ..., m], d: [B, ..., n]
    (the middle axes are the tokens)."""
    a_t, d_t = _tokens(a), _tokens(d)
    _, tokens, m = a_t.shape
    n = d_t.shape[-1]
    if _use_gram(tokens, m, n, kernel_norm):
        return jnp.sum(grams(a) * grams(d), axis=(1, 2))
    per_example = _einsum("btm,btn->bmn", _f32(a_t), _f32(d_t))
    return jnp.sum(jnp.square(per_example), axis=(1, 2))


def _weighted_product(a: jax.Array, d: jax.Array, c: jax.Array) -> jax.Array:
    """``sum_i c_i a_i^T d_i`` (one matmul over examples and tokens); a: [B, ..., m],
    d: [B, ..., n], c: [B]. Rows with c_i = 0 are dropped from both operands;
    both are float32 before c meets them (c is never rounded to their dtype)."""
    a_t = _f32(_tokens(_kept(a, c)))
    return _einsum("btm,btn->mn", a_t, _weighted_tokens(d, c))


def _kept(x: jax.Array, c: jax.Array) -> jax.Array:
    """`x` [B, ...] with the rows of dropped examples (clip factor 0) exactly 0."""
    return clipping_lib.zero_dropped_rows(x, c)


def _weighted_tokens(d: jax.Array, c: jax.Array) -> jax.Array:
    """[B, T, F] float32 ``c_i * d_i,t``, dropped rows exactly 0."""
    return _f32(_tokens(_kept(d, c))) * c[:, None, None]


def _row_sq_norms(v: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(_f32(v)), axis=-1)


# ----------------------------------------------------------------------------
# Per-module rules. Each returns ({leaf: [B] squared norms}, finish) where
# finish(c) gives {leaf: clipped sum} for clip factors c: [B].
# ----------------------------------------------------------------------------


def _dense_rule(leaves, records, cotangents, module_params, grams, kernel_norm):
    x = records.get(modeling.DENSE_IN)  # [B, ..., in]
    d = cotangents.get(modeling.DENSE_OUT)  # [B, ..., out]
    dz = cotangents.get(modeling.LORA_Z_OUT)  # [B, ..., r]
    z = records.get(modeling.LORA_Z)  # [B, ..., r]
    sq: dict[str, jax.Array] = {}
    if "kernel" in leaves:
        sq["kernel"] = _product_sq_norms(x, d, grams, kernel_norm)
    if "bias" in leaves:
        sq["bias"] = _row_sq_norms(jnp.sum(_f32(_tokens(d)), axis=1))
    if "lora_a" in leaves:
        sq["lora_a"] = _product_sq_norms(x, dz, grams, kernel_norm)
    if "lora_b" in leaves:
        # y = ... + (z @ lora_b) * scale: the cotangent of z @ lora_b is scale * d,
        # with the scale as the model uses it (cast to its compute dtype).
        d_b = _f32(d) * _f32(jnp.asarray(module_params[LORA_SCALE], d.dtype))
        sq["lora_b"] = _product_sq_norms(z, d_b, grams, kernel_norm)

    def finish(c):
        out = {}
        if "kernel" in leaves:
            out["kernel"] = _weighted_product(x, d, c)
        if "bias" in leaves:
            out["bias"] = jnp.sum(_weighted_tokens(d, c), axis=(0, 1))
        if "lora_a" in leaves:
            out["lora_a"] = _weighted_product(x, dz, c)
        if "lora_b" in leaves:
            out["lora_b"] = _weighted_product(z, d_b, c)
        return out

    return sq, finish


def _layer_norm_rule(leaves, records, cotangents, module_params, grams, kernel_norm):
    del module_params, grams, kernel_norm
    d = _tokens(cotangents[modeling.NORM_OUT])
    sq: dict[str, jax.Array] = {}
    if "scale" in leaves:
        xhat = _tokens(records[modeling.NORM_XHAT])
        sq["scale"] = _row_sq_norms(jnp.sum(_f32(xhat) * _f32(d), axis=1))
    if "bias" in leaves:
        sq["bias"] = _row_sq_norms(jnp.sum(_f32(d), axis=1))

    def finish(c):
        dc = _weighted_tokens(d, c)
        out = {}
        if "scale" in leaves:
            out["scale"] = jnp.sum(_f32(_kept(xhat, c)) * dc, axis=(0, 1))
        if "bias" in leaves:
            out["bias"] = jnp.sum(dc, axis=(0, 1))
        return out

    return sq, finish


def _embed_rule(leaves, records, cotangents, module_params, grams, kernel_norm):
    del kernel_norm
    rows, features = module_params["embedding"].shape
    d_raw = cotangents[modeling.EMBED_OUT]  # [B, ..., F]
    d = _tokens(d_raw)  # [B, T, F]
    ids = records[modeling.EMBED_IDS]
    ids = ids.reshape(ids.shape[0], -1)  # [B, T]
    if rows == 1:  # nn.Embed broadcasts its single row, whatever the ids
        ids = jnp.zeros_like(ids)
    tokens = ids.shape[1]
    if rows < tokens:
        # Few rows (token types): the per-example [rows, F] gradient is small.
        one_hot = jax.nn.one_hot(ids, rows, dtype=jnp.float32)
        per_example = _einsum("btv,btf->bvf", one_hot, _f32(d))
        sq = jnp.sum(jnp.square(per_example), axis=(1, 2))
    else:
        same = ids[:, :, None] == ids[:, None, :]
        sq = jnp.sum(jnp.where(same, grams(d_raw), 0.0), axis=(1, 2))

    def finish(c):
        dc = _weighted_tokens(d, c)
        table = jnp.zeros((rows, features), jnp.float32)
        return {"embedding": table.at[ids.reshape(-1)].add(dc.reshape(-1, features))}

    return {"embedding": sq}, finish


RULES = {
    modeling.DENSE_OUT: _dense_rule,
    modeling.NORM_OUT: _layer_norm_rule,
    modeling.EMBED_OUT: _embed_rule,
}
