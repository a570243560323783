"""A trained run as a model: load_run / predict_logits, `python -m anadp.predict`,
and `python -m anadp.export` to a Hugging Face folder (read back by our loader and,
where torch is installed, by transformers' PyTorch classes)."""

import json
import os
import shutil
import subprocess
import sys

import launching
import numpy as np
import pytest

import anadp.models as M
from anadp import export, inference, predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
MAX_LENGTH = 32  # launching.TINY's data.max_length

# A 2-step run of the tests' tiny random BERT (tests/launching.py; max_length 32).
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


def launch(workdir, *flags, env_extra=None):
    return launching.launch(workdir, "--config.train.steps=2", *flags, env_extra=env_extra)


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


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The export folder of each kind of run, written once on first use."""
    made = {}

    def get(kind):
        if kind not in made:
            out = tmp_path_factory.mktemp("exports") / kind
            assert export.main([f"--workdir={trained(kind)}", f"--out={out}"]) == 0
            made[kind] = out
        return made[kind]

    return get


def run_logits(workdir, texts=TEXTS):
    model, params, tokenizer, _ = inference.load_run(workdir)
    return inference.predict_logits(model, params, tokenizer, texts, max_length=MAX_LENGTH)


def folder_logits(folder, texts=TEXTS, pooling="cls"):
    model, params = M.from_pretrained(folder, num_labels=2, pooling=pooling)
    return model, inference.predict_logits(model, params, M.tokenizer(folder), texts, max_length=MAX_LENGTH)


# --- weights and configs, without training ------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny-bert-cls", "tiny-roberta"])
def test_hf_state_dict_inverts_the_loader_on_hf_checkpoints(fixture):
    """Names, transposes and LayerNorm weights: exporting a loaded HF checkpoint gives back its tensors."""
    folder = os.path.join(FIXTURES, fixture)
    original = M.read_safetensors(folder)
    head = original.get("classifier.weight", original.get("classifier.out_proj.weight"))
    model, params = M.from_pretrained(folder, num_labels=head.shape[0])
    assert model.load_report.missing == [] and model.load_report.initialized == []
    ignored = {"bert.embeddings.position_ids", "roberta.embeddings.position_ids", "bert.embeddings.token_type_ids"}
    original = {k: v for k, v in original.items() if k not in ignored}
    exported_tensors = export.hf_state_dict(model, params)
    assert sorted(exported_tensors) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported_tensors[key], value, err_msg=key)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_merged_lora_export_round_trips_through_the_loader(pooling):
    """A LoRA model with non-zero adapters: merged, exported and converted back, the
    same tree exactly; and the merged model computes the same logits."""
    lora = M.LoraConfig(rank=4, alpha=8.0, targets=("query", "value", "intermediate"))
    model, params = M.from_config(M.tiny_bert_config(vocab_size=100), 2, lora=lora, seed=3, pooling=pooling)
    flat = M.flatten_params(params)
    rng = np.random.default_rng(0)
    flat = {p: (rng.normal(0, 0.1, v.shape).astype(np.float32) if p[-1] == "lora_b" else v) for p, v in flat.items()}
    params = M.unflatten_params(flat)
    merged, plain = M.merge_lora(params), model.clone(lora=None)
    back, report = M.convert_checkpoint(export.hf_state_dict(plain, merged), plain.config, merged)
    assert report.unexpected == [] and report.missing == []
    for path, value in M.flatten_params(merged).items():
        np.testing.assert_array_equal(M.flatten_params(back)[path], value, err_msg="/".join(path))
    ids = rng.integers(3, 100, (3, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    lora_logits = model.apply({"params": params}, ids, mask, deterministic=True)
    merged_logits = plain.apply({"params": merged}, ids, mask, deterministic=True)
    np.testing.assert_allclose(merged_logits, lora_logits, atol=1e-5)


def test_export_refuses_unmerged_lora():
    model, params = M.from_config(M.tiny_bert_config(vocab_size=100), 2, lora=M.LoraConfig(rank=2))
    with pytest.raises(ValueError, match="merge LoRA"):
        export.hf_state_dict(model, params)


def test_export_config_names_the_class_the_head_needs():
    labels = ["neg", "pos", "mixed"]
    bert, _ = M.from_config(M.tiny_bert_config(vocab_size=100), 3)
    mean, _ = M.from_config(M.tiny_bert_config(vocab_size=100), 3, pooling="mean")
    roberta, _ = M.from_config(os.path.join(FIXTURES, "tiny-roberta"), 3)
    base = {"architectures": ["BertModel"], "_name_or_path": "somewhere", "gradient_checkpointing": False}
    for model, arch, model_type in [(bert, "BertForSequenceClassification", "bert"),
                                    (roberta, "RobertaForSequenceClassification", "roberta"),
                                    (mean, export.MEAN_POOLED_CLASS, M.MEAN_POOLED_BERT_TYPE)]:
        config = export.export_hf_config(model, base, labels)
        assert config["architectures"] == [arch] and config["model_type"] == model_type
        assert config["num_labels"] == 3 and config["id2label"] == {"0": "neg", "1": "pos", "2": "mixed"}
        assert config["label2id"] == {"neg": 0, "pos": 1, "mixed": 2}
        assert config["hidden_size"] == model.config.hidden_size and "_name_or_path" not in config
        assert ("auto_map" in config) == (model is mean)
    # Our own loader reads the mean export's type as a BERT encoder with mean pooling.
    assert M.ModelConfig.from_hf(export.export_hf_config(mean, base, labels)).model_type == "bert"


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


@pytest.mark.parametrize("kind", ["cls", "lora"])
def test_export_reloads_with_our_loader_to_the_same_logits(trained, exported, kind):
    folder = exported(kind)
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md",
                                                 "tokenizer.json", "tokenizer_config.json"}
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["model_type"] == "bert"
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["num_labels"] == 2
    model, logits = folder_logits(folder)
    report = model.load_report
    assert report.missing == [] and report.unexpected == [] and report.initialized == [] and report.loaded > 0
    np.testing.assert_allclose(logits, run_logits(trained(kind)), atol=1e-5)
    # The exported tokenizer truncates where training did.
    tokenizer = M.tokenizer(folder)
    assert tokenizer.model_max_length == MAX_LENGTH
    assert tokenizer(TEXTS[4], truncation=True)["input_ids"] == M.tokenizer("tiny-bert")(
        TEXTS[4], truncation=True, max_length=MAX_LENGTH)["input_ids"]


def _secret_forms(workdir):
    """Text and byte forms in which the run's noise keys or sampler seed could appear in a file."""
    from anadp.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(str(workdir))
    secrets = checkpoint["run"]["secrets"]
    keys = [[int(x) for x in secrets["noise_key"]]]
    mechanism = checkpoint["state"]["mechanism"]
    if isinstance(mechanism, dict) and "noise_key" in mechanism:  # the key after the last step
        keys.append([int(x) for x in np.asarray(mechanism["noise_key"]).reshape(-1)])
    seed = int(secrets["sampler_seed"], 16)
    forms = [str(seed).encode(), format(seed, "x").encode(), seed.to_bytes(16, "little")]
    for key in keys:
        forms += [str(key[0]).encode(), str(key[1]).encode(), str(key[0] << 32 | key[1]).encode(),
                  np.asarray(key, "<u4").tobytes(), np.asarray(key, ">u4").tobytes()]
    return [f for f in forms if len(f) >= 6]  # shorter strings occur by chance


@pytest.mark.parametrize("kind", ["cls", "lora"])
def test_export_holds_nothing_secret(trained, exported, kind):
    from safetensors.numpy import load_file

    workdir, folder = trained(kind), exported(kind)
    secrets = _secret_forms(workdir)
    assert len(secrets) >= 8
    for path in folder.rglob("*"):
        content = path.read_bytes()
        assert not any(s in content for s in secrets), f"{path.name} holds a secret"
        for word in (b"noise_key", b"sampler_seed", b"opt_state", b"realised_ledger"):
            assert word not in content, f"{path.name} mentions {word}"
    names = load_file(str(folder / "model.safetensors"))
    assert all(k.startswith(("bert.", "classifier.")) for k in names)
    assert not any("lora" in k for k in names)


def test_model_card_states_the_guarantee(trained, exported):
    summary = inference.read_summary(trained("cls"))
    card = (exported("cls") / "README.md").read_text()
    for text in [f"| epsilon | {summary['epsilon']:.4f} |", "| delta | 1e-05 |", "PLD", "DP-SGD",
                 "bounded by C = 1", f"| N (training rows) | {summary['num_train']} |", "| randomness | secure |",
                 "| steps | 2 |", f"| validation | {summary['eval']['accuracy']:.4g}", "BertForSequenceClassification"]:
        assert text in card, text
    mean_card = (exported("mean") / "README.md").read_text()
    assert "not differentially private" in mean_card and "trust_remote_code=True" in mean_card


def test_export_refuses_an_unfinished_run_unless_asked(trained, tmp_path, capsys):
    workdir = tmp_path / "unfinished"
    workdir.mkdir()
    source = trained("cls")
    shutil.copy(source / "config.json", workdir / "config.json")
    shutil.copytree(source / "checkpoints", workdir / "checkpoints")
    assert export.main([f"--workdir={workdir}", f"--out={tmp_path / 'out'}"]) == 2
    error = capsys.readouterr().err
    assert "no summary.json" in error and "--allow_unfinished" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert export.main([f"--workdir={workdir}", f"--out={tmp_path / 'out'}", "--allow_unfinished"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Unfinished run" in card and "step 2" in card
    # A folder that already holds files is not written over.
    assert export.main([f"--workdir={workdir}", f"--out={tmp_path / 'out'}", "--allow_unfinished"]) == 2
    assert "not an empty folder" in capsys.readouterr().err


def test_predict_cli_writes_the_rows_with_probabilities(trained, exported, tmp_path):
    path = tmp_path / "reviews.csv"
    rows = [{"id": str(i), "text": t, "note": "x"} for i, t in enumerate(TEXTS)]
    predict.write_rows(str(path), "csv", rows, ["id", "text", "note"])
    out = tmp_path / "predicted.csv"
    result = subprocess.run(
        [sys.executable, "-m", "anadp.predict", f"--workdir={trained('cls')}", f"--input={path}", f"--output={out}"],
        cwd=ROOT, env=launching.launch_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    back, columns = predict.read_rows(str(out), "csv")
    assert columns == ["id", "text", "note", "prediction", "prob_negative", "prob_positive"]
    assert [{k: r[k] for k in ("id", "text", "note")} for r in back] == rows
    probs = np.array([[float(r["prob_negative"]), float(r["prob_positive"])] for r in back])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert [r["prediction"] for r in back] == [["negative", "positive"][i] for i in probs.argmax(axis=1)]
    # The exported folder, read by our own loader, gives the same probabilities.
    _, logits = folder_logits(exported("cls"))
    np.testing.assert_allclose(probs, inference.softmax(logits), atol=1e-5)


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


# --- mean pooling: a custom class ----------------------------------------------------------


def test_mean_pooling_export_ships_its_own_class(trained, exported):
    folder = exported("mean")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [export.MEAN_POOLED_CLASS]
    assert config["model_type"] == M.MEAN_POOLED_BERT_TYPE
    assert config["auto_map"]["AutoModelForSequenceClassification"] == f"modeling_anadp.{export.MEAN_POOLED_CLASS}"
    code = (folder / "modeling_anadp.py").read_text()
    assert "class AnadpBertMeanForSequenceClassification(BertPreTrainedModel)" in code
    assert "add_pooling_layer=False" in code and "import anadp" not in code
    # Our loader recognises it (pooling="auto") and computes the trained function.
    model, logits = folder_logits(folder, pooling="auto")
    assert model.pooling == "mean" and model.load_report.missing == [] and model.load_report.initialized == []
    np.testing.assert_allclose(logits, run_logits(trained("mean")), atol=1e-5)


# --- transformers' PyTorch classes (where torch is installed; skipped in CI) -----------------


def _torch_logits(folder, trust_remote_code=False):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, trust_remote_code=trust_remote_code).eval()
    batch = tokenizer(TEXTS, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        return type(model).__name__, model(**batch).logits.numpy()


@pytest.mark.parametrize("kind", ["cls", "lora", "mean"])
def test_transformers_loads_the_export_to_the_same_logits(trained, exported, kind):
    pytest.importorskip("torch")
    folder = str(exported(kind))
    mean = kind == "mean"
    name, logits = _torch_logits(folder, trust_remote_code=mean)
    assert name == (export.MEAN_POOLED_CLASS if mean else "BertForSequenceClassification")
    np.testing.assert_allclose(logits, run_logits(trained(kind)), atol=1e-4)
    if mean:  # never silently as BertForSequenceClassification (a [CLS] pooler)
        import transformers

        with pytest.raises(ValueError, match="trust_remote_code"):
            transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=False)


# --- the user's own data, end to end ------------------------------------------------------


def _own_data(tmp_path, kind):
    """A 3-class CSV with string labels, or a JSONL sentence-pair task: (train file, flags, input rows)."""
    rng = np.random.default_rng(0)
    words = ["good", "bad", "plot", "actor", "slow", "bright", "odd", "warm", "cold", "long"]

    def sentence():
        return " ".join(rng.choice(words, size=rng.integers(2, 9)))

    if kind == "csv":
        rows = [{"review": sentence(), "sentiment": ["neg", "neutral", "pos"][i % 3]} for i in range(96)]
        path = tmp_path / "train.csv"
        predict.write_rows(str(path), "csv", rows, ["review", "sentiment"])
        flags = ["--config.data.task=csv", "--config.data.text_column=review", "--config.data.label_column=sentiment"]
        inputs = [{"review": r["review"]} for r in rows[:7]]
    else:
        rows = [{"premise": sentence(), "hypothesis": sentence(), "label": i % 2} for i in range(96)]
        path = tmp_path / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        flags = ["--config.data.task=jsonl", "--config.data.text_column=premise",
                 "--config.data.text_pair_column=hypothesis"]
        inputs = [{"premise": r["premise"], "hypothesis": r["hypothesis"]} for r in rows[:7]]
    return path, [f"--config.data.train_file={path}", *flags], inputs


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_own_data_trains_exports_and_predicts_the_same(tmp_path, cache_env, kind):
    """Train on the user's file, export, reload the export with our own loader: the same
    probabilities as `anadp.predict` on the trained run (and, with torch, as transformers)."""
    path, data_flags, inputs = _own_data(tmp_path, kind)
    workdir = tmp_path / "run"
    result = launch(workdir, *data_flags, "--config.model.finetune=full", "--config.privacy.method=dp_sgd",
                    "--config.privacy.noise_multiplier=1.0", env_extra=cache_env)
    assert result.returncode == 0, result.stdout + result.stderr
    labels = json.loads((workdir / "labels.json").read_text())
    assert labels == (["neg", "neutral", "pos"] if kind == "csv" else ["0", "1"])

    folder = tmp_path / "export"
    assert export.main([f"--workdir={workdir}", f"--out={folder}"]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {str(i): name for i, name in enumerate(labels)}

    fmt = kind
    source = tmp_path / f"input.{fmt}"
    predict.write_rows(str(source), fmt, inputs, list(inputs[0]))
    out = tmp_path / f"predicted.{fmt}"
    result = subprocess.run(
        [sys.executable, "-m", "anadp.predict", f"--workdir={workdir}", f"--input={source}", f"--output={out}"],
        cwd=ROOT, env=launching.launch_env(cache_env), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    back, _ = predict.read_rows(str(out), fmt)
    probs = np.array([[float(r[f"prob_{name}"]) for name in labels] for r in back])

    texts = [r[list(inputs[0])[0]] for r in inputs]
    pairs = [r["hypothesis"] for r in inputs] if kind == "jsonl" else None
    model, params = M.from_pretrained(folder, num_labels=len(labels))
    logits = inference.predict_logits(model, params, M.tokenizer(folder), texts, pairs, max_length=MAX_LENGTH)
    np.testing.assert_allclose(inference.softmax(logits), probs, atol=1e-5)
    try:
        import torch
        import transformers
    except ImportError:
        return  # the suite does not depend on torch; where it is installed, check transformers too
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(hf(**batch).logits.numpy(), logits, atol=1e-4)
