"""End to end: launch.py on a tiny random BERT, resume after SIGKILL, bad configs."""

import json
import os
import signal
import time

import numpy as np
import pytest
from launching import TINY, launch


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    return {"ANADP_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


def test_launch_writes_summary_metrics_and_plots(tmp_path, cache_env):
    workdir = tmp_path / "run"
    result = launch(workdir, "--config.train.steps=4", "--config.train.eval_every=2", "--config.privacy.gamma=1.0",
                    env_extra=cache_env)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    for key in ["task", "method", "finetune", "epsilon", "delta", "noise_multiplier", "steps", "eval",
                "nonprivate/wall_time_s", "randomness"]:
        assert key in summary
    assert summary["method"] == "anadp" and summary["steps"] == 4
    assert summary["pooling"] == "cls"  # "auto" resolved: random weights were trained with no pooling
    assert 0 < summary["epsilon"] <= 3.0 + 1e-3
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert "noise_scales" in records[-1] and "importance_weight_corr" in records[-1]
    # Timing is marked non-private; no other private diagnostic is written by default.
    assert all("nonprivate/elapsed_s" in r for r in records)
    assert not any(k.startswith("nonprivate/") and k != "nonprivate/elapsed_s" or k == "loss"
                   for r in records for k in r)
    for png in ["training_curves.png", "noise_scales.png", "noise_scales_over_time.png"]:
        assert (workdir / png).stat().st_size > 1000
    assert "dev accuracy" in result.stdout and "epsilon" in result.stdout
    assert json.loads((workdir / "labels.json").read_text()) == ["negative", "positive"]
    # TensorBoard: the same public scalars at the same steps, no nonprivate/ ones.
    board = read_tensorboard(workdir / "tensorboard")
    for tag, value_of in [("validation/accuracy", lambda r: r["eval"]["validation"]["accuracy"]),
                          ("validation/loss", lambda r: r["eval"]["validation"]["loss"]),
                          ("epsilon", lambda r: r["epsilon"]),
                          ("importance_weight_corr", lambda r: r["importance_weight_corr"])]:
        assert board[tag] == {r["step"]: pytest.approx(value_of(r), rel=1e-6) for r in records}, tag
    assert not any(tag.startswith("nonprivate/") for tag in board)


def read_tensorboard(folder) -> dict:
    """{tag: {step: value}} of the scalars in a folder's event files, read without
    TensorFlow: TFRecord framing (length, its CRC, an Event proto, its CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def final_params(workdir):
    from anadp import checkpoint

    state = checkpoint.load_checkpoint(str(workdir))["state"]
    return state["trainable"], state["mechanism"]


def flat(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _copy_first_checkpoint(workdir, target):
    """The run's config and its step-0 checkpoint (its secrets, before any step) in a new workdir."""
    import shutil

    target.mkdir()
    shutil.copy(workdir / "config.json", target / "config.json")
    shutil.copytree(workdir / "checkpoints" / "0", target / "checkpoints" / "0")


@pytest.mark.parametrize("randomness", ["seeded", "secure"])
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, cache_env, randomness):
    """Seeded: against a second run of the same command. Secure: against an
    uninterrupted run from the same secrets (the interrupted run's step-0 checkpoint)."""
    flags = ["--config.train.steps=6", "--config.train.eval_every=3", "--config.train.checkpoint_every=2",
             "--config.privacy.method=anadp", "--config.privacy.gamma=1.0",
             f"--config.privacy.randomness={randomness}"]
    reference = tmp_path / "reference"
    if randomness == "seeded":
        result = launch(reference, *flags, env_extra=cache_env)
        assert result.returncode == 0, result.stdout + result.stderr

    interrupted = tmp_path / "interrupted"
    proc = launch(interrupted, *flags, env_extra=cache_env, wait=False)
    checkpoints = interrupted / "checkpoints"
    deadline = time.time() + 600
    copied = randomness == "seeded"
    # Kill as soon as a checkpoint at step 2 or 4 exists (mid-run).
    while time.time() < deadline and proc.poll() is None:
        names = {p.name for p in checkpoints.iterdir()} if checkpoints.exists() else set()
        if not copied and "0" in names:
            _copy_first_checkpoint(interrupted, reference)
            copied = True
        if names & {"2", "4"}:
            break
        time.sleep(0.05)
    assert copied, "the step-0 checkpoint was never seen"
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "summary.json").exists()

    resumed = launch(interrupted, *flags, env_extra=cache_env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step" in resumed.stderr
    if randomness == "secure":
        result = launch(reference, *flags, env_extra=cache_env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "resumed from step 0" in result.stderr

    a_params, a_mech = final_params(reference)
    b_params, b_mech = final_params(interrupted)
    for x, y in zip(flat(a_params), flat(b_params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    for x, y in zip(flat(a_mech), flat(b_mech)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    sa = json.loads((reference / "summary.json").read_text())
    sb = json.loads((interrupted / "summary.json").read_text())
    assert sa["epsilon"] == sb["epsilon"] and sa["eval"] == sb["eval"]
    assert sa["randomness"] == sb["randomness"] == randomness
    ma = (reference / "metrics.jsonl").read_text().splitlines()
    mb = (interrupted / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "nonprivate/elapsed_s"}  # noqa: E731
                           for x in lines]
    assert strip(ma) == strip(mb)


def _secret_strings(workdir):
    """Text forms in which the run's noise key or sampler seed could appear in a file."""
    from anadp import checkpoint

    run = checkpoint.load_checkpoint(str(workdir))["run"]  # every checkpoint holds the same secrets
    key = [int(x) for x in run["secrets"]["noise_key"]]
    seed = int(run["secrets"]["sampler_seed"], 16)
    forms = [str(seed), format(seed, "x"), str(key[0]), str(key[1]), str(key[0] << 32 | key[1])]
    return [f.encode() for f in forms if len(f) >= 6]  # shorter strings occur by chance


def test_secure_randomness_differs_between_runs_and_stays_in_the_checkpoints(tmp_path, cache_env):
    flags = ["--config.train.steps=2", "--config.train.eval_every=1", "--config.privacy.method=dp_sgd"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for workdir in runs:
        result = launch(workdir, *flags, env_extra=cache_env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "randomness=seeded" not in result.stderr
        assert json.loads((workdir / "summary.json").read_text())["randomness"] == "secure"
    (a_params, _), (b_params, _) = final_params(runs[0]), final_params(runs[1])
    assert any(not np.array_equal(x, y) for x, y in zip(flat(a_params), flat(b_params)))
    assert _secret_strings(runs[0]) != _secret_strings(runs[1])

    workdir = runs[0]
    secrets = _secret_strings(workdir)
    assert len(secrets) >= 3
    outside = [p for p in workdir.rglob("*") if p.is_file() and "checkpoints" not in p.relative_to(workdir).parts]
    assert {p.name for p in outside} >= {"config.json", "summary.json", "metrics.jsonl", "training_curves.png"}
    for path in outside:
        content = path.read_bytes()
        for secret in secrets:
            assert secret not in content, f"{path.name} holds a secret"
    assert (workdir / "checkpoints").stat().st_mode & 0o077 == 0, "checkpoints must be owner-only"


def test_seeded_randomness_is_reproducible_and_says_so(tmp_path, cache_env):
    flags = ["--config.train.steps=2", "--config.privacy.method=dp_sgd", "--config.privacy.randomness=seeded"]
    runs = [tmp_path / "a", tmp_path / "b"]
    for workdir in runs:
        result = launch(workdir, *flags, env_extra=cache_env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "privacy.randomness=seeded" in result.stderr and "regenerate" in result.stderr
        assert json.loads((workdir / "summary.json").read_text())["randomness"] == "seeded"
    for x, y in zip(flat(final_params(runs[0])[0]), flat(final_params(runs[1])[0])):
        np.testing.assert_array_equal(x, y)


def test_literal_variant_reports_its_worst_case_epsilon(tmp_path, cache_env):
    from anadp import accounting

    workdir = tmp_path / "literal"
    result = launch(workdir, "--config.train.steps=4", "--config.privacy.clipping=global",
                    "--config.privacy.gamma=1.0", "--config.privacy.rho=2.0", env_extra=cache_env)
    assert result.returncode == 0, result.stdout + result.stderr
    s = json.loads((workdir / "summary.json").read_text())
    assert 0 < s["worst_case_noise_scale"] < 1
    realised = s["epsilon_realised_sequence_not_a_guarantee"]
    assert s["epsilon"] > s["dp_sgd_epsilon_same_sigma"] and s["epsilon"] >= realised
    # Step 0 is uniform; the other 3 are composed at sigma * s_min.
    sigma, q = s["noise_multiplier"], s["sampling_rate"]
    ledger = accounting.PrivacyLedger("pld", reference_noise_multiplier=sigma)
    ledger.record(q, sigma)
    ledger.record(q, sigma * s["worst_case_noise_scale"], count=3)
    assert s["epsilon"] == pytest.approx(ledger.epsilon(s["delta"]), rel=1e-9)


def tiny_config(*flags):
    """The launch command's config, built in this process (flags as `launch` takes them)."""
    from configs import base

    config = base.get_config()
    for flag in [*TINY, *flags]:
        dotted, value = flag[len("--config."):].split("=")
        group, field = dotted.split(".")
        config[group][field] = type(config[group][field])(value)
    return config


def test_resume_with_another_accounting_constant_is_refused(tmp_path, cache_env, monkeypatch):
    from anadp import accounting, train

    for k, v in cache_env.items():
        monkeypatch.setenv(k, v)
    config = tiny_config("--config.train.steps=1", "--config.privacy.method=dp_sgd")
    workdir = str(tmp_path / "run")
    train.run(config, workdir)
    monkeypatch.setattr(accounting, "DEFAULT_PLD_DISCRETIZATION", accounting.DEFAULT_PLD_DISCRETIZATION / 2)
    with pytest.raises(ValueError, match="pld_discretization: 0.0001 in the checkpoint, 5e-05 now"):
        train.run(config, workdir)


def test_noise_key_is_split_once_per_step_and_checkpointed(tmp_path, cache_env):
    """Every checkpoint holds a fresh key: the previous one split once per step."""
    import jax

    from anadp import checkpoint

    workdir = tmp_path / "keys"
    result = launch(workdir, "--config.train.steps=3", "--config.train.checkpoint_every=1",
                    "--config.privacy.method=dp_sgd", env_extra=cache_env)
    assert result.returncode == 0, result.stdout + result.stderr
    key_2 = np.asarray(checkpoint.load_checkpoint(str(workdir), 2)["state"]["mechanism"]["noise_key"], np.uint32)
    key_3 = np.asarray(checkpoint.load_checkpoint(str(workdir), 3)["state"]["mechanism"]["noise_key"], np.uint32)
    assert not np.array_equal(key_2, key_3)
    np.testing.assert_array_equal(np.asarray(jax.random.split(key_2)[0]), key_3)


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.data.task=sst3", "config.data.task='sst3' is invalid: known tasks are"),
        ("--config.privacy.method=dpsgd", "config.privacy.method='dpsgd' is invalid"),
        ("--config.privacy.epsilon=0", "config.privacy.epsilon=0.0 is invalid"),
        ("--config.privacy.delta=0.5", "delta=0.5 must be below 1/N"),
        ("--config.train.microbatch_size=5", "config.train.microbatch_size=5 is invalid: must divide"),
        ("--config.privacy.gamma=nan", "gamma=nan must be a finite number"),
    ],
)
def test_bad_config_is_refused_with_the_field_named(tmp_path, cache_env, flag, message):
    result = launch(tmp_path / "bad", flag, env_extra=cache_env)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "bad" / "summary.json").exists()


def test_unwritable_workdir_is_refused(tmp_path, cache_env):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = launch(blocker / "run", env_extra=cache_env)
    assert result.returncode != 0 and "is not writable" in result.stderr


def test_workdir_of_another_config_is_refused(tmp_path, cache_env):
    workdir = tmp_path / "run"
    first = launch(workdir, "--config.train.steps=1", "--config.privacy.method=dp_sgd", env_extra=cache_env)
    assert first.returncode == 0, first.stderr
    second = launch(workdir, "--config.train.steps=1", "--config.privacy.method=anadp", env_extra=cache_env)
    assert second.returncode != 0
    assert "different config" in second.stderr and "method" in second.stderr


# --- bad input: one line, exit code 2, and the workdir as it was ---------------------

BAD_INPUTS = {
    "unknown field": (["--config.train.stepz=1"],
                      "error: --config.train.stepz=1: config.train has no field 'stepz' (did you mean 'steps'?"),
    "missing config file": (["--config={tmp}/no-config.py"], "error: --config={tmp}/no-config.py: no such config file"),
    "unknown model": (["--config.model.name=no-such-model"],
                      "error: config.model.name='no-such-model': could not fetch 'no-such-model' from the Hugging"),
    "missing model folder": (["--config.model.name={tmp}/no-model/"],
                             "error: config.model.name='{tmp}/no-model/': model directory '{tmp}/no-model/' does "
                             "not exist"),
    "missing GLUE data": (["--config.data.task=sst2", "--config.data.dir={tmp}/no-glue"],
                          "error: config.data.dir='{tmp}/no-glue': GLUE directory '{tmp}/no-glue' (from the "
                          "data_dir argument) does not exist"),
    "negative warmup": (["--config.train.lr_warmup_steps=-1"],
                        "error: config.train.lr_warmup_steps=-1 is invalid: must be >= 0"),
    "negative weight decay": (["--config.train.weight_decay=-1.0"],
                              "error: config.train.weight_decay=-1.0 is invalid: must be >= 0"),
    "negative lora alpha": (["--config.model.lora_alpha=-1"],
                            "error: config.model.lora_alpha=-1.0 is invalid: must be > 0"),
    "unknown clipping with dp_sgd": (["--config.privacy.method=dp_sgd", "--config.privacy.clipping=elliptic"],
                                     "error: config.privacy.clipping='elliptic' is invalid: must be one of "
                                     "('elliptical', 'global')"),
    "csv without a file": (["--config.data.task=csv"],
                           "error: config.data.train_file='' is invalid: must name your CSV file for data.task=csv"),
    "missing csv file": (["--config.data.task=csv", "--config.data.train_file={tmp}/none.csv"],
                         "error: data.train_file={tmp}/none.csv: no such file"),
    "csv without the text column": (["--config.data.task=csv", "--config.data.train_file={tmp}/reviews.csv"],
                                    "error: data.train_file={tmp}/reviews.csv line 1: no column 'text' "
                                    "(columns: review, label)"),
    "too large a batch for the data": (["--config.data.task=csv", "--config.data.train_file={tmp}/small.csv"],
                                       "error: config.train.expected_batch_size=32 is invalid: must be at most "
                                       "the 18 training rows"),
}

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # tests never download


def _bad_input_files(tmp_path):
    (tmp_path / "reviews.csv").write_text("review,label\ngood,1\nbad,0\n")
    (tmp_path / "small.csv").write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20)))


def _assert_refused_in_one_line(result, message):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-3000:]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_no_trace(tmp_path, cache_env, case):
    """The workdir (and the parent folder it needed) did not exist, and still does not."""
    flags, message = BAD_INPUTS[case]
    _bad_input_files(tmp_path)
    workdir = tmp_path / "new" / "run"
    result = launch(workdir, *[f.format(tmp=tmp_path) for f in flags], env_extra={**cache_env, **OFFLINE})
    _assert_refused_in_one_line(result, message.format(tmp=tmp_path))
    assert not (tmp_path / "new").exists()


def test_failed_runs_leave_the_workdir_as_found_and_the_corrected_command_runs(tmp_path, cache_env, monkeypatch):
    """A run that fails in its first step (after config.json, labels.json and the
    step-0 checkpoint were written) takes them away again, as the bad inputs that
    fail earlier do; then another config trains in the same workdir (not refused
    as "a different config")."""
    from anadp import train

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("the user's own file")
    for k, v in {**cache_env, **OFFLINE}.items():
        monkeypatch.setenv(k, v)
    seen = {}

    def first_step_fails(*args, **kwargs):
        seen["workdir"] = sorted(os.listdir(workdir))
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(train, "make_step_functions", first_step_fails)
    with pytest.raises(RuntimeError, match="simulated"):
        train.run(tiny_config("--config.train.steps=1", "--config.privacy.method=dp_sgd"), str(workdir))
    assert seen["workdir"] == ["checkpoints", "config.json", "labels.json", "notes.txt"]
    assert os.listdir(workdir) == ["notes.txt"]
    monkeypatch.undo()

    _bad_input_files(tmp_path)
    for case in ("unknown field", "negative weight decay", "missing GLUE data", "missing model folder"):
        flags, message = BAD_INPUTS[case]
        result = launch(workdir, *[f.format(tmp=tmp_path) for f in flags], env_extra={**cache_env, **OFFLINE})
        _assert_refused_in_one_line(result, message.format(tmp=tmp_path))
        assert os.listdir(workdir) == ["notes.txt"], case

    result = launch(workdir, "--config.train.steps=1", env_extra={**cache_env, **OFFLINE})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (workdir / "notes.txt").read_text() == "the user's own file"
    assert json.loads((workdir / "labels.json").read_text()) == ["negative", "positive"]
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 1


def test_reading_a_workdir_without_checkpoints_creates_nothing(tmp_path):
    from anadp import checkpoint

    with pytest.raises(ValueError, match="has no checkpoint"):
        checkpoint.load_checkpoint(str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fields, message", [
    ({"data.train_file": "x.csv"}, "config.data.train_file='x.csv' is invalid: must be empty unless data.task is"),
    ({"data.task": "jsonl", "data.train_file": "x.jsonl", "data.dir": "/glue"},
     "config.data.dir='/glue' is invalid: must be empty with data.task=jsonl"),
    ({"data.task": "csv", "data.train_file": "x.csv", "data.text_column": " "},
     "config.data.text_column=' ' is invalid: must name a column"),
    ({"data.task": "csv", "data.train_file": "x.csv", "data.label_column": "text"},
     "config.data.label_column='text' is invalid: must differ from data.text_column"),
    ({"data.task": "csv", "data.train_file": "x.csv", "data.text_pair_column": "text"},
     "config.data.text_pair_column='text' is invalid: must differ from data.text_column"),
    ({"model.lora_rank": 0}, "config.model.lora_rank=0 is invalid: must be >= 1"),
    ({"model.lora_dropout": 1.0}, "config.model.lora_dropout=1.0 is invalid: must be in [0, 1)"),
])
def test_validate_config_names_the_bad_field(fields, message):
    from anadp import train
    from configs import base

    config = base.get_config()
    for dotted, value in fields.items():
        group, field = dotted.split(".")
        config[group][field] = value
    with pytest.raises(ValueError) as info:
        train.validate_config(config)
    assert str(info.value).startswith(message)


def test_tensorboard_scalars_leave_nonprivate_keys_to_the_debug_switch():
    from anadp import workdir as workdir_lib

    record = {"step": 3, "eval": {"validation": {"accuracy": 0.5, "loss": 0.7}}, "epsilon": 1.5,
              "noise_scales": {"a": 1.0}, "importance_weight_corr": 0.25, "nonprivate/elapsed_s": 9.0}
    public = {"validation/accuracy": 0.5, "validation/loss": 0.7, "epsilon": 1.5, "importance_weight_corr": 0.25}
    assert workdir_lib.tensorboard_scalars(record) == public
    assert workdir_lib.tensorboard_scalars(record, include_nonprivate=True) == {**public, "nonprivate/elapsed_s": 9.0}


def test_csv_run_writes_its_classes_and_macro_f1(tmp_path, cache_env):
    words = {"pos": ["great", "lovely", "superb"], "neg": ["awful", "dull", "bad"], "mixed": ["odd", "uneven"]}
    lines = ["text,label"] + [f'"A {words[label][i % len(words[label])]} film, take {i}",{label}'
                              for i in range(60) for label in [("pos", "neg", "mixed")[i % 3]]]
    train_file = tmp_path / "reviews.csv"
    train_file.write_text("\n".join(lines) + "\n")
    workdir = tmp_path / "run"
    result = launch(workdir, "--config.data.task=csv", f"--config.data.train_file={train_file}",
                    "--config.train.steps=2", "--config.train.eval_every=1", "--config.privacy.method=dp_sgd",
                    env_extra={**cache_env, **OFFLINE})
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((workdir / "labels.json").read_text()) == ["mixed", "neg", "pos"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["task"] == "csv" and summary["num_train"] == 54  # 60 rows, 6 held out as the dev split
    assert set(summary["eval"]) == {"accuracy", "macro_f1", "loss"}
    board = read_tensorboard(workdir / "tensorboard")
    assert sorted(board["validation/macro_f1"]) == [1, 2] and sorted(board["epsilon"]) == [1, 2]
