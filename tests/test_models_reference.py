"""Our Flax encoders against Hugging Face PyTorch outputs on the same weights.

The references are fixtures made by tests/make_reference_outputs.py (in a
separate torch virtualenv); these tests do not need torch.
"""
import os

import jax
import numpy as np

import anadp.models as M

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOL = 1e-4


def _ref(name):
    return dict(np.load(os.path.join(FIXTURES, name)))


def _run(model, params, ref):
    """(last hidden states, logits, BERT pooler output) in one compiled program."""

    def both(module, ids, mask, tt):
        hidden = module.encode(ids, mask, tt, deterministic=True)
        pooled = module.pool(hidden, mask) if module.config.model_type == "bert" else None
        return hidden, module.head(hidden, mask, deterministic=True), pooled

    f = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=both))
    out = f(params, ref["input_ids"], ref["attention_mask"], ref.get("token_type_ids"))
    return tuple(None if x is None else np.asarray(x) for x in out)


def test_minilm_matches_pytorch_bert():
    ref = _ref("minilm_reference.npz")
    # The fixture has padding and both token types.
    assert (ref["attention_mask"] == 0).any() and (ref["token_type_ids"] == 1).any()
    model, params = M.from_pretrained("minilm-l6", num_labels=2)
    hidden, logits, pooled = _run(model, params, ref)
    assert hidden.shape == ref["last_hidden_state"].shape
    assert logits.shape == (len(hidden), 2)
    assert np.abs(hidden - ref["last_hidden_state"]).max() < TOL
    assert np.abs(pooled - ref["pooler_output"]).max() < TOL


def test_tiny_roberta_matches_pytorch_roberta():
    ref = _ref("tiny_roberta_reference.npz")
    assert (ref["input_ids"] == 1).any()  # RoBERTa padding (pad_token_id = 1)
    model, params = M.from_pretrained(os.path.join(FIXTURES, "tiny-roberta"), num_labels=3)
    report = model.load_report
    assert model.config.model_type == "roberta"
    assert report.missing == [] and report.unexpected == [] and report.initialized == []
    hidden, logits, _ = _run(model, params, ref)
    assert np.abs(hidden - ref["last_hidden_state"]).max() < TOL
    # RobertaClassificationHead (dense-tanh-out_proj on <s>), loaded from the checkpoint.
    assert np.abs(logits - ref["logits"]).max() < TOL


def test_tiny_bert_classifier_matches_pytorch():
    """``bert.``-prefixed keys, gelu_new, BERT's pooler + linear head."""
    ref = _ref("tiny_bert_cls_reference.npz")
    model, params = M.from_pretrained(os.path.join(FIXTURES, "tiny-bert-cls"), num_labels=2)
    assert model.config.hidden_act == "gelu_new"
    assert model.load_report.missing == [] and model.load_report.unexpected == []
    hidden, logits, _ = _run(model, params, ref)
    assert np.abs(hidden - ref["last_hidden_state"]).max() < TOL
    assert np.abs(logits - ref["logits"]).max() < TOL


def test_head_of_other_size_is_reinitialised_and_reported():
    model, params = M.from_pretrained(os.path.join(FIXTURES, "tiny-bert-cls"), num_labels=5)
    report = model.load_report
    assert {m[0] for m in report.mismatched} == {"classifier.weight", "classifier.bias"}
    assert sorted(report.initialized) == ["classifier/bias", "classifier/kernel"]
    assert params["classifier"]["kernel"].shape == (32, 5)


def test_padding_does_not_change_real_tokens():
    """Extra padding columns leave the real positions' hidden states unchanged."""
    ref = _ref("tiny_roberta_reference.npz")
    model, params = M.from_pretrained(os.path.join(FIXTURES, "tiny-roberta"), num_labels=3)
    ids, mask = ref["input_ids"][2:3], ref["attention_mask"][2:3]
    n = int(mask.sum())
    assert n < ids.shape[1]
    encode = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method=model.encode))
    short = encode(params, ids[:, :n], mask[:, :n])
    long = encode(params, ids, mask)
    np.testing.assert_allclose(np.asarray(long)[:, :n], np.asarray(short), atol=1e-5)
