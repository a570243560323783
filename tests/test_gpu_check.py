"""experiments/gpu_check.sh and its grid (experiments/gpu_check.py), on the CPU."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

import anadp.models as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "gpu_check.sh")
# XLA's CPU optimisations cost most of the tiny grid's time and nothing it checks.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def gpu_check(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHON=sys.executable, XLA_FLAGS=FAST_XLA)
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_mode_writes_a_table(tmp_path):
    """tiny-bert, one cell (LoRA, bfloat16, batch 4), the three methods; no pytest."""
    result = gpu_check("--tiny", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    table = (tmp_path / "benchmarks.md").read_text()
    for method in ("non_private", "dp_sgd", "anadp"):
        assert f"| tiny-bert | lora | bfloat16 | 4 | {method} |" in table
    assert table.count("| ok |") == 3
    report = json.loads((tmp_path / "benchmarks.json").read_text())
    (cell,) = report["cells"]
    assert cell["status"] == "ok" and cell["args"]["dtype"] == "bfloat16" and cell["args"]["engine"] == "ghost"
    assert all(cell["methods"][m]["step_time_s"] > 0 for m in ("non_private", "dp_sgd", "anadp"))
    assert not (tmp_path / "pytest.log").exists()
    assert "| anadp |" in result.stdout


def test_unknown_argument_is_refused():
    result = gpu_check("--fast")
    assert result.returncode == 2 and "unknown argument --fast" in result.stderr


def test_grid_records_failures_and_skips_what_the_budget_cannot_fit(tmp_path, monkeypatch):
    """A failing cell is recorded with its error and the grid goes on; once less
    time is left than the last cell took, the remaining cells are skipped."""
    sys.path.insert(0, ROOT)
    from experiments import gpu_check as grid_lib

    clock = {"now": 0.0}
    monkeypatch.setattr(grid_lib.time, "monotonic", lambda: clock["now"])
    calls = []

    def fake_time_cell(model, params, batches, args):
        calls.append((args["dtype"], model.dtype))
        clock["now"] += 40.0
        if args["dtype"] == "float32":
            raise MemoryError("RESOURCE_EXHAUSTED: out of memory\nmore detail")
        return {m: {"step_time_s": 0.5, "examples_per_s": 8.0, "peak_memory_bytes": 2**20, "compile_time_s": 1.0}
                for m in grid_lib.METHODS}

    monkeypatch.setattr(grid_lib, "time_cell", fake_time_cell)
    grid = dict(grid_lib.GRIDS["tiny"], dtypes=("float32", "bfloat16"), batch_sizes=(4, 8))
    cells = grid_lib.run_grid(grid, str(tmp_path), budget_s=100.0)
    statuses = [c["status"] for c in cells]
    assert statuses[0] == "failed: MemoryError: RESOURCE_EXHAUSTED: out of memory"
    assert statuses[1] == "ok" and statuses[2].startswith("skipped:") and statuses[3].startswith("skipped:")
    # Each cell's model computes in its dtype (the parameters are shared, float32).
    assert [(wanted, jnp.dtype(got).name) for wanted, got in calls] == [("float32",) * 2, ("bfloat16",) * 2]
    table = (tmp_path / "benchmarks.md").read_text()
    assert "| tiny-bert | lora | float32 | 4 | - |" in table and "| tiny-bert | lora | bfloat16 | 4 | anadp |" in table
    assert table.count("skipped:") == 2


def test_random_minilm_has_the_checkpoint_shapes():
    """minilm-l6-random (the GPU check's MiniLM) is MiniLM-L6's config.json."""
    try:
        folder = M.minilm_path()
    except ImportError:
        pytest.skip("the MiniLM checkpoint package is not installed")
    assert M.ModelConfig.from_hf(M.minilm_l6_config()) == M.ModelConfig.from_hf(folder)
