"""A trained run as a model: load_run / predict_logits."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import anadp.models as M
from anadp import inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MAX_LENGTH = 32

# As in tests/test_train.py: a 2-step run of a tiny random BERT on rotten_tomatoes.
TINY = [
    "--config.model.name=tiny-bert",
    f"--config.data.max_length={MAX_LENGTH}",
    "--config.train.expected_batch_size=32",
    "--config.train.physical_batch_size=16",
    "--config.train.microbatch_size=8",
    "--config.train.eval_batch_size=256",
    "--config.train.learning_rate=1e-3",
    "--config.train.steps=2",
]
# noise_multiplier fixed: calibrating it to an epsilon is slow and not under test here.
RUN_FLAGS = {
    "cls": ["--config.model.finetune=full", "--config.privacy.method=dp_sgd", "--config.privacy.noise_multiplier=1.0"],
    "lora": ["--config.model.finetune=lora", "--config.privacy.method=anadp", "--config.privacy.noise_multiplier=1.0"],
    "mean": ["--config.model.finetune=full", "--config.model.pooling=mean", "--config.privacy.method=non_private"],
}
TEXTS = [
    "a fine, warm film",
    "dull and far too long",
    "",
    "ça alors ! 🎬 un film étonnant",
    "the plot " * 40,  # longer than max_length: truncated as in training
    "not bad at all",
]


def _env(extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra or {})
    return env


def launch(workdir, *flags, env_extra=None):
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--workdir={workdir}", *TINY, *flags]
    return subprocess.run(cmd, cwd=ROOT, env=_env(env_extra), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return {"ANADP_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_env):
    """The workdir of each kind of run, trained once on first use."""
    made = {}

    def get(kind):
        if kind not in made:
            workdir = tmp_path_factory.mktemp("runs") / kind
            result = launch(workdir, *RUN_FLAGS[kind], env_extra=cache_env)
            assert result.returncode == 0, result.stdout + result.stderr
            made[kind] = workdir
        return made[kind]

    return get


def run_logits(workdir, texts=TEXTS):
    model, params, tokenizer, _ = inference.load_run(workdir)
    return inference.predict_logits(model, params, tokenizer, texts, max_length=MAX_LENGTH)


# --- columns, labels, tokenisation --------------------------------------------------------------


def test_text_columns_and_labels_come_from_the_run(tmp_path):
    config = {"data": {"task": "rotten_tomatoes"}}
    assert inference.text_columns(config) == ("text",)
    assert inference.text_columns({"data": {"task": "mrpc"}}) == ("sentence1", "sentence2")
    assert inference.text_columns({"data": {"task": "x", "text_column": "body", "text_pair_column": ""}}) == ("body",)
    assert inference.text_columns({"data": {"task": "x", "text_column": "q", "text_pair_column": "a"}}) == ("q", "a")
    assert inference.run_labels(tmp_path, config) == ["negative", "positive"]
    (tmp_path / "labels.json").write_text(json.dumps(["spam", "ham", "eggs"]))
    assert inference.run_labels(tmp_path, config) == ["spam", "ham", "eggs"]


def test_encode_tokenises_like_the_training_data(cache_env):
    from anadp import data

    tokenizer = M.tokenizer("tiny-bert")
    task = data.load_task("rotten_tomatoes", tokenizer, MAX_LENGTH, cache_dir=cache_env["ANADP_CACHE_DIR"])
    raw = data.read_movie_reviews(data.get_task("rotten_tomatoes"))["validation"]
    ours = inference.encode(tokenizer, raw["text"][:100], None, MAX_LENGTH)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(ours[key], task.eval_splits["validation"][key][:100], err_msg=key)


# --- trained runs -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cls", "lora"])
def test_load_run_rebuilds_the_trained_model(trained, kind):
    """The dev loss and accuracy the run reported, recomputed from load_run: the frozen
    part rebuilt from the seed, the trainable part from the checkpoint."""
    from anadp import data

    workdir = trained(kind)
    model, params, tokenizer, labels = inference.load_run(workdir)
    assert labels == ["negative", "positive"] and model.lora is None  # LoRA merged
    raw = data.read_movie_reviews(data.get_task("rotten_tomatoes"))["validation"]
    logits = inference.predict_logits(model, params, tokenizer, raw["text"], max_length=MAX_LENGTH, batch_size=256)
    y = np.asarray(raw["label"])
    log_probs = np.log(inference.softmax(logits))
    summary = inference.read_summary(workdir)
    assert float(np.mean(logits.argmax(1) == y)) == pytest.approx(summary["eval"]["accuracy"], abs=1e-12)
    assert -float(np.mean(log_probs[np.arange(len(y)), y])) == pytest.approx(summary["eval"]["loss"], abs=1e-6)
    # Training moved the trainable params away from their initial values.
    _, initial = M.from_pretrained("tiny-bert", 2, seed=0)
    assert np.abs(np.asarray(params["classifier"]["kernel"]) - initial["classifier"]["kernel"]).max() > 1e-4


def test_unmerged_lora_run_computes_the_same_logits(trained):
    model, params, tokenizer, _ = inference.load_run(trained("lora"), merge=False)
    assert model.lora is not None
    assert any(p[-1] == "lora_b" for p in M.flatten_params(params))
    unmerged = inference.predict_logits(model, params, tokenizer, TEXTS, max_length=MAX_LENGTH)
    np.testing.assert_allclose(unmerged, run_logits(trained("lora")), atol=1e-5)

