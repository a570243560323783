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
    for key in ["task", "method", "finetune", "epsilon", "delta", "noise_multiplier", "steps", "eval", "wall_time_s"]:
        assert key in summary
    assert summary["method"] == "anadp" and summary["steps"] == 4
    assert 0 < summary["epsilon"] <= 3.0 + 1e-3
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert "noise_scales" in records[-1] and "importance_weight_corr" in records[-1]
    assert not any(k.startswith("nonprivate/") or k == "loss" for r in records for k in r)
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


@pytest.mark.parametrize("method", ["anadp"])
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, cache_env, method):
    flags = ["--config.train.steps=6", "--config.train.eval_every=3", "--config.train.checkpoint_every=2",
             f"--config.privacy.method={method}", "--config.privacy.gamma=1.0"]
    reference = tmp_path / "reference"
    result = launch(reference, *flags, env_extra=cache_env)
    assert result.returncode == 0, result.stdout + result.stderr

    interrupted = tmp_path / "interrupted"
    proc = launch(interrupted, *flags, env_extra=cache_env, wait=False)
    checkpoints = interrupted / "checkpoints"
    deadline = time.time() + 600
    # Kill as soon as a checkpoint at step 2 or 4 exists (mid-run).
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.exists() and any(p.name in ("2", "4") for p in checkpoints.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "summary.json").exists()

    resumed = launch(interrupted, *flags, env_extra=cache_env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step" in resumed.stderr

    a_params, a_mech = final_params(reference)
    b_params, b_mech = final_params(interrupted)
    for x, y in zip(flat(a_params), flat(b_params)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    for x, y in zip(flat(a_mech), flat(b_mech)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    sa = json.loads((reference / "summary.json").read_text())
    sb = json.loads((interrupted / "summary.json").read_text())
    assert sa["epsilon"] == sb["epsilon"] and sa["eval"] == sb["eval"]
    ma = (reference / "metrics.jsonl").read_text().splitlines()
    mb = (interrupted / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in lines]  # noqa: E731
    assert strip(ma) == strip(mb)


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
