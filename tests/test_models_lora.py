"""LoRA, trainable/frozen partitions, merged export, per-example vmap, dropout."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import anadp.models as M

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-bert-cls")
ALL_TARGETS = M.LAYER_DENSE_MODULES


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 64, size=(4, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    ids = ids * mask
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types * mask,
            "labels": np.array([0, 1, 1, 0], np.int32)}


@functools.partial(jax.jit, static_argnums=(0,))
def _logits_jit(model, params, b):
    return model.apply({"params": params}, b["input_ids"], b["attention_mask"],
                       b["token_type_ids"], deterministic=True)


def _logits(model, params, b):
    # Models are hashable (config, num_labels, lora), so one compilation per model.
    return np.asarray(_logits_jit(model, params, b))


def _mean_loss(model, trainable, frozen, b):
    logits = _logits_jit(model, M.combine(trainable, frozen), b)
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()


_grad = jax.jit(jax.grad(_mean_loss, argnums=1), static_argnums=(0,))


@pytest.fixture(scope="module")
def base():
    return M.from_pretrained(FIXTURE, 2)


@pytest.fixture(scope="module")
def lora_model():
    """LoRA on every dense module of each layer."""
    return M.from_pretrained(FIXTURE, 2, lora=M.LoraConfig(rank=2, alpha=3.0, targets=ALL_TARGETS))


def _with_random_b(params, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    flat = M.flatten_params(params)
    for path, x in flat.items():
        if path[-1] == "lora_b":
            flat[path] = jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32)
    return M.unflatten_params(flat)


def _paths(tree):
    return set(M.flatten_params(tree))


def test_lora_at_init_equals_frozen_model(batch, base, lora_model):
    model, params = lora_model
    layer = params["encoder"]["layer_1"]["attention"]
    assert layer["query"]["lora_a"].shape == (32, 2) and layer["query"]["lora_b"].shape == (2, 32)
    assert float(layer["query"]["lora_scale"]) == 1.5
    lora_b = [x for p, x in M.flatten_params(params).items() if p[-1] == "lora_b"]
    lora_a = [x for p, x in M.flatten_params(params).items() if p[-1] == "lora_a"]
    assert len(lora_b) == 2 * len(ALL_TARGETS)
    assert all(np.all(np.asarray(b) == 0) for b in lora_b)  # B = 0
    assert all(np.any(np.asarray(a) != 0) for a in lora_a)  # A random
    base_logits = _logits(*base, batch)
    # The adapter term is exactly 0; with adapters in front of the GELU, XLA may
    # fuse the layer differently from the base model, which can move the last bit.
    np.testing.assert_allclose(_logits(model, params, batch), base_logits, rtol=0, atol=1e-6)
    # Default targets (query, value): bit-identical logits.
    default, default_params = M.from_pretrained(FIXTURE, 2, lora=M.LoraConfig())
    attn = default_params["encoder"]["layer_0"]["attention"]
    assert "lora_a" in attn["query"] and "lora_a" in attn["value"]
    assert "lora_a" not in attn["key"] and "lora_a" not in attn["output"]
    assert np.array_equal(_logits(default, default_params, batch), base_logits)


def test_lora_gradient_step_changes_only_trainable(batch, lora_model):
    model, params = lora_model
    trainable, frozen = M.partition(params, "lora")
    names = {"/".join(p) for p in _paths(trainable)}
    assert names == {n for n in map("/".join, _paths(params))
                     if n.endswith(("lora_a", "lora_b")) or n.startswith(("classifier/", "pooler/"))}
    assert not _paths(trainable) & _paths(frozen)
    assert _paths(trainable) | _paths(frozen) == _paths(params)

    grads = _grad(model, trainable, frozen, batch)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(trainable)
    new_trainable = jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, trainable, grads)
    new_params = M.combine(new_trainable, frozen)

    old, new = M.flatten_params(params), M.flatten_params(new_params)
    assert set(old) == set(new)
    for path in old:
        same = np.array_equal(np.asarray(old[path]), np.asarray(new[path]))
        if path in _paths(trainable):
            # B (and the head) move; A's gradient is 0 while B = 0.
            if path[-1] in ("lora_b", "kernel"):
                assert not same, path
        else:
            assert same, path
    assert not np.array_equal(_logits(model, new_params, batch), _logits(model, params, batch))


def test_merged_export_matches_lora_model(batch, base, lora_model):
    model, params = lora_model
    params = _with_random_b(params)
    merged = M.merge_lora(params)
    assert not any(p[-1].startswith("lora") for p in _paths(merged))
    base_model, base_params = base
    assert model.clone(lora=None) == base_model
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base_params)
    lora_logits = _logits(model, params, batch)
    assert not np.allclose(lora_logits, _logits(base_model, base_params, batch))
    np.testing.assert_allclose(_logits(base_model, merged, batch), lora_logits, atol=1e-5)


def test_partition_modes():
    model, params = M.from_config(M.tiny_bert_config(vocab_size=64), 3,
                                  lora=M.LoraConfig(rank=2))
    full, frozen = M.partition(params, "full")
    assert {p[-1] for p in _paths(frozen)} == {"lora_scale"}
    bias, frozen = M.partition(params, "bias")
    names = {"/".join(p) for p in _paths(bias)}
    assert all(n.endswith("/bias") or n.startswith(("classifier/", "pooler/")) for n in names)
    assert "encoder/layer_0/norm/bias" in names and "classifier/kernel" in names
    assert "pooler/bias" in names and "pooler/kernel" in names  # the pooler is part of BERT's head
    assert "encoder/layer_0/attention/query/kernel" not in names
    assert M.combine(bias, frozen).keys() == params.keys()
    encoder, frozen = M.partition(params, "frozen_embeddings")
    assert {p[0] for p in _paths(frozen) if p[-1] != "lora_scale"} == {"embeddings"}
    assert {p[0] for p in _paths(encoder)} == {"encoder", "pooler", "classifier"}
    assert _paths(encoder) | _paths(frozen) == _paths(params)
    with pytest.raises(ValueError, match="unknown finetune mode 'adapter'.*full, frozen_embeddings, lora, bias, head"):
        M.partition(params, "adapter")
    _, plain = M.from_config(M.tiny_bert_config(vocab_size=64), 3)
    with pytest.raises(ValueError, match="no LoRA factors.*LoraConfig"):
        M.partition(plain, "lora")
    with pytest.raises(ValueError, match="in both trees"):
        M.combine(full, full)


def test_head_mode_trains_only_the_classifier(batch):
    """The private linear probe: BERT's pooler and the encoder stay frozen."""
    model, params = M.from_config(M.tiny_bert_config(vocab_size=64), 2, lora=M.LoraConfig(rank=2))
    trainable, frozen = M.partition(params, "head")
    assert {"/".join(p) for p in _paths(trainable)} == {"classifier/kernel", "classifier/bias"}
    assert "pooler/kernel" in {"/".join(p) for p in _paths(frozen)}
    assert _paths(trainable) | _paths(frozen) == _paths(params)
    grads = _grad(model, trainable, frozen, batch)
    assert np.any(np.asarray(grads["classifier"]["kernel"]))
    # RoBERTa's classifier holds dense and out_proj: a 2-layer head.
    _, params = M.from_pretrained(os.path.join(os.path.dirname(FIXTURE), "tiny-roberta"), 3)
    trainable, _ = M.partition(params, "head")
    assert {"/".join(p) for p in _paths(trainable)} == {
        f"classifier/{layer}/{leaf}" for layer in ("dense", "out_proj") for leaf in ("kernel", "bias")}


def test_lora_config_validation():
    with pytest.raises(ValueError, match="target 'qkv' matches no dense module.*attention.query"):
        M.LoraConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="rank"):
        M.LoraConfig(rank=0)
    assert M.LoraConfig(targets="query").targets == ("query",)
    cfg = M.LoraConfig(targets=("output",))
    assert cfg.matches("attention.output") and cfg.matches("output")
    assert not M.LoraConfig(targets=("attention.output",)).matches("output")


def test_lora_targets_all_covers_every_dense_matrix_of_every_layer():
    assert M.LoraConfig(targets="all").targets == M.LAYER_DENSE_MODULES
    assert M.LoraConfig(targets=("query", "all")).targets == M.LAYER_DENSE_MODULES
    _, params = M.from_config(M.tiny_bert_config(vocab_size=64), 2, lora=M.LoraConfig(targets="all"))
    for i in range(2):
        layer = M.flatten_params(params["encoder"][f"layer_{i}"])
        dense = {".".join(p[:-1]) for p in layer if p[-1] == "kernel"}  # what modeling builds
        adapted = {".".join(p[:-1]) for p in layer if p[-1] == "lora_a"}
        assert dense == adapted == set(M.LAYER_DENSE_MODULES) and len(adapted) == 6
        assert {".".join(p[:-1]) for p in layer if p[-1] == "lora_b"} == adapted
    assert not any(p[-1] == "lora_a" for p in M.flatten_params(params) if p[0] != "encoder")


def test_layer_and_matrix():
    assert M.layer_and_matrix(("encoder", "layer_3", "attention", "query", "lora_a")) == (
        3, "attention.query.lora_a")
    assert M.layer_and_matrix(("classifier", "kernel")) == (None, "classifier.kernel")
    assert M.layer_and_matrix("encoder/layer_11/output/kernel") == (11, "output.kernel")
    assert M.layer_and_matrix(("embeddings", "norm", "scale")) == (None, "embeddings.norm.scale")
    _, params = M.from_config(M.tiny_bert_config(vocab_size=64), 2, lora=M.LoraConfig())
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    layers = {M.layer_and_matrix(path)[0] for path, _ in flat}  # jax key paths work too
    assert layers == {None, 0, 1}
    outside = {M.layer_and_matrix(path)[1].split(".")[0] for path, _ in flat
               if M.layer_and_matrix(path)[0] is None}
    assert outside == {"embeddings", "pooler", "classifier"}


def test_per_example_vmap_matches_batch_gradient(batch, lora_model):
    """A per-example function (batch axis of 1 added inside) under jax.vmap."""
    model, params = lora_model
    trainable, frozen = M.partition(_with_random_b(params, scale=0.1), "lora")

    def example_loss(tr, ex):
        logits = model.apply({"params": M.combine(tr, frozen)}, ex["input_ids"][None],
                             ex["attention_mask"][None], ex["token_type_ids"][None])[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ex["labels"])

    per_example = jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0)))(trainable, batch)
    mean = _grad(model, trainable, frozen, batch)
    n = len(batch["labels"])
    for a, b in zip(jax.tree_util.tree_leaves(per_example), jax.tree_util.tree_leaves(mean)):
        np.testing.assert_allclose(np.asarray(a).sum(0), n * np.asarray(b), atol=1e-5)
    leaf = per_example["encoder"]["layer_0"]["attention"]["query"]["lora_b"]
    assert leaf.shape == (n, 2, 32)


def test_dropout_uses_its_own_rng_stream(batch):
    # One layer and "rbg" keys: threefry dropout masks take XLA:CPU ~5 s to compile.
    config = dict(M.tiny_bert_config(vocab_size=64), num_hidden_layers=1)
    model, params = M.from_config(config, 2, lora=M.LoraConfig(rank=2, dropout=0.5))
    params = _with_random_b(params)
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    @jax.jit
    def train_logits(key):
        return model.apply({"params": params}, *args, deterministic=False, rngs={"dropout": key})

    key0, key1 = jax.random.key(0, impl="rbg"), jax.random.key(1, impl="rbg")
    a, b = train_logits(key0), train_logits(key1)
    assert np.array_equal(a, train_logits(key0))
    assert not np.allclose(a, b)
    assert not np.allclose(a, _logits(model, params, batch))
    with pytest.raises(Exception, match="dropout"):
        jax.eval_shape(lambda: model.apply({"params": params}, *args, deterministic=False))
