"""Checkpoint loading, short names, configs, tokenizers, and their errors."""
import json
import os

import jax
import numpy as np
import pytest

import anadp.models as M

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_minilm_loads_without_missing_encoder_weights():
    model, params = M.from_pretrained("minilm-l6", num_labels=3, seed=7)
    report = model.load_report
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert sorted(report.initialized) == ["classifier/bias", "classifier/kernel"]
    assert report.loaded == 103  # all 104 tensors but the position_ids buffer
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert sorted(params["encoder"]) == [f"layer_{i}" for i in range(6)]
    kernel = params["classifier"]["kernel"]
    assert kernel.shape == (384, 3) and params["classifier"]["bias"].shape == (3,)
    assert 0.01 < float(np.std(kernel)) < 0.03  # N(0, initializer_range = 0.02)
    # The query kernel is the transposed PyTorch (out, in) weight.
    from safetensors.numpy import load_file

    raw = load_file(os.path.join(M.minilm_path(), "model.safetensors"))
    np.testing.assert_array_equal(params["encoder"]["layer_3"]["attention"]["query"]["kernel"],
                                  raw["encoder.layer.3.attention.self.query.weight"].T)
    # The head depends on the seed only.
    _, again = M.from_pretrained("minilm-l6", num_labels=3, seed=7)
    np.testing.assert_array_equal(kernel, again["classifier"]["kernel"])


def test_missing_and_unexpected_keys_are_reported(tmp_path, caplog):
    from safetensors.numpy import load_file, save_file

    src = os.path.join(FIXTURES, "tiny-bert-cls")
    tensors = load_file(os.path.join(src, "model.safetensors"))
    del tensors["bert.encoder.layer.1.attention.self.key.weight"]
    tensors["cls.predictions.bias"] = np.zeros(64, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    with caplog.at_level("INFO", logger="anadp.models.loading"):
        model, params = M.from_pretrained(tmp_path, num_labels=2)
    report = model.load_report
    assert report.missing == ["encoder/layer_1/attention/key/kernel"]
    assert report.unexpected == ["cls.predictions.bias"]
    assert "encoder/layer_1/attention/key/kernel" in caplog.text
    assert "cls.predictions.bias" in caplog.text
    assert params["encoder"]["layer_1"]["attention"]["key"]["kernel"].shape == (32, 32)


def test_shape_mismatch_in_encoder_is_an_error(tmp_path):
    src = os.path.join(FIXTURES, "tiny-bert-cls")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["intermediate_size"] = 41
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(src, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"intermediate.dense.bias' has shape \(40,\), but the config implies \(41,\).*"
                                         "does config.json match"):
        M.from_pretrained(tmp_path, num_labels=2)


def test_tiny_bert_short_name_and_tokenizer():
    model, params = M.from_pretrained("tiny-bert", num_labels=2)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.intermediate_size, cfg.max_position_embeddings) == (2, 32, 2, 64, 128)
    tok = M.tokenizer("tiny-bert")
    assert cfg.vocab_size == len(tok) == 30522 and tok.model_max_length == 128
    assert params["embeddings"]["word_embeddings"]["embedding"].shape == (30522, 32)
    enc = tok(["a fine film"], ["sure"], return_tensors="np")
    assert enc["input_ids"][0, 0] == tok.cls_token_id and enc["token_type_ids"].max() == 1


def test_from_config_accepts_dicts_and_pretrained_configs():
    from transformers import RobertaConfig

    hf = RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=24, max_position_embeddings=20)
    model, params = M.from_config(hf, num_labels=4, seed=1)
    assert model.config.model_type == "roberta" and model.config.pad_token_id == 1
    assert params["classifier"]["out_proj"]["kernel"].shape == (16, 4)
    assert "pooler" not in params
    model2, params2 = M.from_config(hf.to_dict(), num_labels=4, seed=1)
    assert model2 == model
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, params2)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        M.from_config({"model_type": "gpt2"}, 2)
    with pytest.raises(ValueError, match="num_labels"):
        M.from_config(hf, 0)


def test_roberta_base_config_shapes():
    model = M.EncoderClassifier(M.ModelConfig.from_hf(M.roberta_base_config()), 2)
    ids = np.full((1, 4), 5, np.int32)
    shapes = jax.eval_shape(lambda k: model.init(k, ids, np.ones_like(ids)), jax.random.PRNGKey(0))
    params = shapes["params"]
    assert len(params["encoder"]) == 12
    assert params["embeddings"]["word_embeddings"]["embedding"].shape == (50265, 768)
    assert params["embeddings"]["position_embeddings"]["embedding"].shape == (514, 768)
    assert params["encoder"]["layer_0"]["intermediate"]["kernel"].shape == (768, 3072)
    assert 124e6 < M.count_params(params) < 126e6
    assert model.config.max_sequence_length == 512


def test_hub_name_offline_fails_with_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    for fn in (lambda: M.from_pretrained("roberta-base", 2), lambda: M.tokenizer("bert-base-uncased")):
        with pytest.raises(OSError, match="Hugging Face Hub.*local directory") as info:
            fn()
        assert "config.json and model.safetensors" in str(info.value)


def test_missing_directory_and_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*config.json and model.safetensors"):
        M.from_pretrained(str(tmp_path / "nope" / "model"), 2)
    (tmp_path / "config.json").write_text(json.dumps(M.tiny_bert_config(64)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no model.safetensors.*PyTorch pickles"):
        M.from_pretrained(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.from_pretrained(os.path.join(FIXTURES), 2)


def test_check_max_length():
    bert = M.ModelConfig.from_hf(M.tiny_bert_config())
    assert M.check_max_length(128, bert) == 128
    with pytest.raises(ValueError, match="max_length=129 exceeds the model's 128 positions"):
        M.check_max_length(129, bert)
    with pytest.raises(ValueError, match="max_length=513 exceeds the model's 512 positions.*"
                                         "514.*RoBERTa"):
        M.check_max_length(513, M.roberta_base_config())
    model, _ = M.from_pretrained(os.path.join(FIXTURES, "tiny-roberta"), 3)
    with pytest.raises(ValueError, match="max_length=21 exceeds the model's 20 positions"):
        M.check_max_length(21, model)  # a model works too (its .config)
    with pytest.raises(ValueError, match="integer >= 2"):
        M.check_max_length(0, bert)
