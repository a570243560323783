"""Data-parallel training over several devices equals the one-device run.

JAX fixes its device count when it is imported, so every multi-device check
runs in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=4`
(CPU devices standing in for GPUs / TPU cores). `WORKER` runs a few DP-SGD and
ANADP steps of a tiny BERT through `train.make_step_functions` and
`sharding.put_batch`, the same pieces `train.run` uses, and saves everything
to compare; it runs once with 1 device and once with 4.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent(
    r'''
    import sys, types
    import jax, jax.numpy as jnp, ml_collections, numpy as np
    from anadp import models, sampling, sharding, train
    from anadp.noise import Mechanism

    out_path = sys.argv[1]
    n_dev = jax.device_count()
    out = {}
    checks = {"devices": n_dev, "realised": [], "shards_equal": {}}

    def shards_equal(tree):
        """Every device holds the same values (and all of the array)."""
        for leaf in jax.tree_util.tree_leaves(tree):
            shards = [np.asarray(s.data) for s in leaf.addressable_shards]
            if len(shards) != n_dev or any(s.shape != leaf.shape for s in shards):
                return False
            if not all(np.array_equal(shards[0], s) for s in shards[1:]):
                return False
        return True

    # Data: 48 examples of 16 random tokens; the physical batch (18 rows) is not a
    # multiple of 4 and splits into per-device microbatches of 3 after padding (24).
    rng = np.random.default_rng(0)
    n, length, vocab = 48, 16, 64
    lengths = rng.integers(4, length + 1, n)
    attention = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    data = {
        "input_ids": (rng.integers(1, vocab, (n, length)) * attention).astype(np.int32),
        "attention_mask": attention,
        "token_type_ids": np.zeros((n, length), np.int32),
        "labels": rng.integers(0, 2, n).astype(np.int32),
        "lengths": lengths,
    }
    lora = models.LoraConfig(rank=2, alpha=4.0, dropout=0.0, targets=("query", "value"))
    model, params = models.from_config(dict(models.tiny_bert_config(vocab), num_hidden_layers=1), 2, lora, seed=0)
    trainable, frozen = models.partition(params, "lora")
    for i, leaf in enumerate(jax.tree_util.tree_leaves(trainable)):
        out[f"init/param{i}"] = np.asarray(leaf)
    physical, micro = 18, 3
    rows = sharding.padded_batch_size(physical, micro)
    sampler = sampling.PoissonSampler(n, 20 / n, physical, seed=3)
    checks["rows"] = rows

    def config(dropout):
        c = ml_collections.ConfigDict()
        c.model = ml_collections.ConfigDict({"dropout": dropout})
        # dropout needs per-example gradients (vmap); otherwise the default ghost engine
        c.train = ml_collections.ConfigDict(
            {"microbatch_size": micro, "clipping_engine": "vmap" if dropout else "ghost"}
        )
        return c

    def run(name, mechanism, dropout, steps=3, accumulate=None):
        cfg = config(dropout)
        optimizer = train.make_optimizer(
            ml_collections.ConfigDict(dict(learning_rate=1e-2, lr_warmup_steps=0, schedule="constant",
                                           optimizer="adam", weight_decay=0.0)), steps)
        fns = train.make_step_functions(model, mechanism, optimizer, cfg)
        if accumulate is not None:  # the same clipped sums (saves a compilation)
            fns.accumulate = accumulate
        state = train.TrainState(trainable, optimizer.init(trainable), mechanism.init(trainable))
        state, frozen_r = sharding.replicate(state), sharding.replicate(frozen)
        # The loop's own step; no buckets: every pass has `length` tokens.
        inputs = train.StepInputs(fns, mechanism, frozen_r, sampler, data, (), length, rows,
                                  dropout_base=jax.random.PRNGKey(100) if dropout else None)
        for step in range(steps):
            if name == "dp_sgd":
                for batch_rows, batch, mask in train.device_passes(inputs, step):
                    checks["realised"].append(batch_rows.num_real)
                    checks.setdefault("batch_sharded", str(mask.sharding) if n_dev > 1 else "")
            state, _ = train.train_step(inputs, state, step)
        summed = train.sum_passes(fns, mechanism, state, frozen_r,
                                  ((b, m) for _, b, m in train.device_passes(inputs, steps)))
        checks["shards_equal"][name] = shards_equal(state)
        for i, leaf in enumerate(jax.tree_util.tree_leaves(state.trainable)):
            out[f"{name}/param{i}"] = np.asarray(leaf)
        return fns, state, summed, frozen_r

    common = dict(l2_norm_clip=0.05, expected_batch_size=20.0, seed=7)
    dp = Mechanism(noise_multiplier=1.0, **common)
    fns, state, summed, frozen_r = run("dp_sgd", dp, dropout=False)
    run("dp_sgd_no_noise", Mechanism(noise_multiplier=0.0, **common), dropout=False, accumulate=fns.accumulate)
    run("anadp", Mechanism(noise_multiplier=1.0, adaptive=True, clipping="elliptical", gamma=1.0, rho=2.0,
                           importance="private_profile", **common), dropout=True)

    # The noise of one release, from the replicated key: identical on every device.
    # DP-SGD releases (sum + sigma C z) / qN, so the noise is release - sum / qN.
    noisy = jax.jit(lambda summed, s: dp.release(summed, s.mechanism, s.trainable)[0])(summed, state)
    noise = jax.tree_util.tree_map(lambda r, g: r - g / dp.expected_batch_size, noisy, summed.grads)
    checks["shards_equal"]["released"] = shards_equal(noisy)
    checks["shards_equal"]["noise"] = shards_equal(noise)
    for i, leaf in enumerate(jax.tree_util.tree_leaves(noise)):
        out[f"noise/{i}"] = np.asarray(leaf)

    # Per-example gradients inside sum_over_devices are per example, not already
    # summed across devices: sum_i ||g_i|| (nonlinear in g_i) of a linear model.
    def norm_sum(w, x, y, mask):
        g = jax.vmap(jax.grad(lambda w, xi, yi: (xi @ w - yi) ** 2), in_axes=(None, 0, 0))(w, x, y)
        return jnp.sum(jnp.linalg.norm(g, axis=1) * mask)
    x, y = rng.normal(size=(18, 5)).astype(np.float32), rng.normal(size=18).astype(np.float32)
    (xs, ys), m = sharding.put_batch(lambda ids: (x[ids], y[ids]), (np.arange(18) < 15).astype(np.float32), rows)
    w = sharding.replicate(np.linspace(-1, 1, 5).astype(np.float32))
    out["norm_sum"] = np.asarray(jax.jit(sharding.sum_over_devices(norm_sum, 1))(w, xs, ys, m))

    # Evaluation with a batch size that is not a multiple of 4 (padded, then cut).
    spec = types.SimpleNamespace(compute_metrics=lambda p, l: {"accuracy": float(np.mean(p == l))})
    split = {k: data[k][:30] for k in data}
    out["eval_loss"] = np.asarray(train.evaluate(fns, state.trainable, frozen_r, split, spec, 10, (), length)["loss"])

    np.savez(out_path, **out)
    print("CHECKS " + __import__("json").dumps(checks))
    '''
)


def start_worker(tmp_path, devices):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"out{devices}.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.Popen([sys.executable, str(script), str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


def crash_report(stdout: str, stderr: str) -> str:
    """The ends of a failed subprocess's output, without the list of extension modules that
    Python's fatal-error handler appends (it alone would fill the message)."""
    stderr = "\n".join(x for x in stderr.splitlines() if not x.startswith("Extension modules:"))
    return stdout[-3000:] + stderr[-8000:]


def finish_worker(proc, out):
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, crash_report(stdout, stderr)
    line = next(x for x in stdout.splitlines() if x.startswith("CHECKS "))
    return dict(np.load(out)), json.loads(line[len("CHECKS "):])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker with 1 and with 4 devices (run side by side)."""
    started = {d: start_worker(tmp_path_factory.mktemp(f"dev{d}"), d) for d in (1, 4)}
    return {d: finish_worker(*started[d]) for d in started}


def params(out, name):
    keys = [k for k in out if k.startswith(name + "/param")]
    return [out[k] for k in sorted(keys, key=lambda k: int(k.rsplit("param", 1)[1]))]


def test_worker_ran_on_4_devices_with_padded_batches(runs):
    one, four = runs[1][1], runs[4][1]
    assert one["devices"] == 1 and four["devices"] == 4
    assert one["rows"] == 18 and four["rows"] == 24  # 18 -> 4 devices x 2 microbatches x 3 rows
    assert "P('data',)" in four["batch_sharded"]
    # The same Poisson draws, and sampled batch sizes that are not multiples of 4.
    assert one["realised"] == four["realised"]
    assert any(r % 4 for r in four["realised"]), four["realised"]


@pytest.mark.parametrize("name", ["dp_sgd", "anadp", "dp_sgd_no_noise"])
def test_parameters_equal_the_one_device_run(runs, name):
    one, four = params(runs[1][0], name), params(runs[4][0], name)
    assert len(one) == len(four) >= 6
    for a, b in zip(one, four):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert runs[4][1]["shards_equal"][name]  # every device holds the same parameters and state
    start = params(runs[1][0], "init")  # the steps moved the parameters, so the comparison means something
    assert any(not np.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(one, start))


def test_noise_is_identical_on_every_device_and_to_one_device(runs):
    four = runs[4][1]["shards_equal"]
    assert four["released"] and four["noise"]
    one_noise = [v for k, v in sorted(runs[1][0].items()) if k.startswith("noise/")]
    four_noise = [v for k, v in sorted(runs[4][0].items()) if k.startswith("noise/")]
    assert len(one_noise) == len(four_noise) >= 6
    total = sum(float(np.sum(x**2)) for x in four_noise)
    assert total > 0
    for a, b in zip(one_noise, four_noise):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_per_example_values_are_not_summed_across_devices(runs):
    np.testing.assert_allclose(runs[4][0]["norm_sum"], runs[1][0]["norm_sum"], rtol=1e-5)


def test_evaluation_with_padded_batches_matches(runs):
    np.testing.assert_allclose(runs[4][0]["eval_loss"], runs[1][0]["eval_loss"], rtol=1e-5)


# Full fine-tuning: its many parameter leaves once deadlocked XLA:CPU's 4 devices
# (leafwise adds queued behind the pass's psum; see StepFunctions.add).
LAUNCH_FLAGS = [
    "--config.model.name=tiny-bert", "--config.model.finetune=full", "--config.data.max_length=32",
    "--config.data.bucket_lengths=",
    "--config.train.expected_batch_size=32", "--config.train.physical_batch_size=10",
    "--config.train.microbatch_size=5", "--config.train.eval_batch_size=250", "--config.train.learning_rate=1e-3",
    "--config.train.steps=3", "--config.train.eval_every=3",
    "--config.privacy.gamma=1.0", "--config.privacy.noise_multiplier=1.0",
]  # physical batch 10 -> 12 rows on 4 devices; one sequence length: one compilation


def launch(workdir, cache_dir, devices_per_process, *extra, wait=True):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", ANADP_CACHE_DIR=str(cache_dir),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--workdir={workdir}", *LAUNCH_FLAGS, *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc.communicate(timeout=600) + (proc.returncode,) if wait else proc


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """launch.py, one process with 4 CPU devices."""
    workdir = tmp_path_factory.mktemp("launch") / "run"
    cache = tmp_path_factory.mktemp("cache")
    stdout, stderr, rc = launch(workdir, cache, 4)
    return workdir, cache, stdout, stderr, rc


def test_launch_on_4_fake_devices(launched):
    workdir, _, stdout, stderr, rc = launched
    assert rc == 0, crash_report(stdout, stderr)
    assert "data parallel over 4 cpu devices in 1 process(es)" in stderr
    assert "padded to 12 rows for 4 devices" in stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["versions"]["devices"] == 4 and summary["steps"] == 3
    assert summary["epsilon"] > 0 and summary["noise_multiplier"] == 1.0
    assert 0.0 <= summary["eval"]["accuracy"] <= 1.0
    assert (workdir / "checkpoints" / "3").is_dir() and (workdir / "noise_scales.png").exists()
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3]


@pytest.mark.skipif(not os.environ.get("ANADP_TEST_MULTIPROCESS"),
                    reason="about 100 s more; set ANADP_TEST_MULTIPROCESS=1 to run")
def test_two_processes_match_one_process(launched, tmp_path):
    """Two processes x 2 CPU devices (jax.distributed over localhost) == one process x 4 devices,
    both seeded: secret randomness would give each run its own batches and noise."""
    import socket

    import jax

    from anadp import checkpoint

    _, cache, *_ = launched  # for its tokenised cache
    seeded = "--config.privacy.randomness=seeded"
    reference = tmp_path / "reference"
    stdout, stderr, rc = launch(reference, cache, 4, seeded)
    assert rc == 0, crash_report(stdout, stderr)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    workdir = tmp_path / "run"
    procs = [launch(workdir, cache, 2, seeded, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                    f"--process_id={i}", wait=False) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:] + err[-5000:]
    assert "in 2 process(es)" in outputs[0][1] and "dev accuracy" in outputs[0][0]
    assert "dev accuracy" not in outputs[1][0]  # only process 0 reports
    a = checkpoint.load_checkpoint(str(reference))["state"]
    b = checkpoint.load_checkpoint(str(workdir))["state"]
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
    sa = json.loads((reference / "summary.json").read_text())
    sb = json.loads((workdir / "summary.json").read_text())
    assert sb["versions"]["processes"] == 2 and sa["epsilon"] == sb["epsilon"]
