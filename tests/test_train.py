"""End to end: launch.py on a tiny random BERT, resume after SIGKILL, bad configs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config.model.name=tiny-bert",
    "--config.data.max_length=32",
    "--config.train.expected_batch_size=32",
    "--config.train.physical_batch_size=16",
    "--config.train.microbatch_size=8",
    "--config.train.eval_batch_size=256",
    "--config.train.learning_rate=1e-3",
]


def launch(workdir, *flags, env_extra=None, wait=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.update(env_extra or {})
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--workdir={workdir}", *TINY, *flags]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


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


def final_params(workdir):
    from anadp import train

    state = train.load_checkpoint(str(workdir))["state"]
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
    from anadp import train

    run = train.load_checkpoint(str(workdir))["run"]  # every checkpoint holds the same secrets
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


def test_resume_with_another_accounting_constant_is_refused(tmp_path, cache_env, monkeypatch):
    from anadp import accounting, train
    from configs import base

    for k, v in cache_env.items():
        monkeypatch.setenv(k, v)
    config = base.get_config()
    for flag in [*TINY, "--config.train.steps=1", "--config.privacy.method=dp_sgd"]:
        dotted, value = flag[len("--config."):].split("=")
        group, field = dotted.split(".")
        config[group][field] = type(config[group][field])(value)
    workdir = str(tmp_path / "run")
    train.run(config, workdir)
    monkeypatch.setattr(accounting, "DEFAULT_PLD_DISCRETIZATION", accounting.DEFAULT_PLD_DISCRETIZATION / 2)
    with pytest.raises(ValueError, match="pld_discretization: 0.0001 in the checkpoint, 5e-05 now"):
        train.run(config, workdir)


def test_noise_key_is_split_once_per_step_and_checkpointed(tmp_path, cache_env):
    """Every checkpoint holds a fresh key: the previous one split once per step."""
    import jax

    from anadp import train

    workdir = tmp_path / "keys"
    result = launch(workdir, "--config.train.steps=3", "--config.train.checkpoint_every=1",
                    "--config.privacy.method=dp_sgd", env_extra=cache_env)
    assert result.returncode == 0, result.stdout + result.stderr
    key_2 = np.asarray(train.load_checkpoint(str(workdir), 2)["state"]["mechanism"]["noise_key"], np.uint32)
    key_3 = np.asarray(train.load_checkpoint(str(workdir), 3)["state"]["mechanism"]["noise_key"], np.uint32)
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
