"""experiments/grid.py and its modules (grids, cells, runner, collect) and experiments/heatmap.py, without training."""

import csv
import importlib.util
import io
import json
import os
import socket
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    path = os.path.join(ROOT, "experiments", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


grid = _load("grid")  # the command line; it puts the repository on sys.path
heatmap = _load("heatmap")
analysis = _load("analysis")

from experiments.cells import plan  # noqa: E402
from experiments.collect import CSV_COLUMNS, aggregate, collect, load_rows  # noqa: E402
from experiments.grids import GRIDS  # noqa: E402
from experiments.runner import LOCK_NAME, run_grid  # noqa: E402

# --- grid definitions and commands -----------------------------------------------


def dry_run(capsys, *args):
    assert grid.main(list(args) + ["--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [x for x in lines if not x.startswith("#")], lines


def test_dry_run_rt_main_commands(tmp_path, capsys):
    commands, _ = dry_run(capsys, "rt_main", "--seeds=0", f"--root={tmp_path}")
    names = [c.split("--workdir=")[1].split()[0].rsplit("/", 1)[1] for c in commands]
    assert names == [
        "rotten_tomatoes-lora-non_private-learning_rate0.002-seed0",
        "rotten_tomatoes-lora-dp_sgd-eps1-seed0",
        "rotten_tomatoes-lora-dp_sgd-eps3-seed0",
        "rotten_tomatoes-lora-dp_sgd-eps8-seed0",
        "rotten_tomatoes-lora-anadp-elementwise-g0.5-r2-eps1-seed0",
        "rotten_tomatoes-lora-anadp-elementwise-g0.5-r2-eps3-seed0",
        "rotten_tomatoes-lora-anadp-elementwise-g0.5-r2-eps8-seed0",
    ]
    dp3 = commands[2].split()
    assert dp3[1:4] == ["launch.py", "--config=configs/default.py", f"--workdir={tmp_path}/{names[2]}"]
    assert "--config.privacy.method=dp_sgd" in dp3 and "--config.privacy.epsilon=3.0" in dp3
    assert "--config.train.seed=0" in dp3
    assert not any("epsilon" in flag for flag in commands[0].split())  # non-private: no epsilon


def test_grids_pin_the_recipe_they_were_written_against(monkeypatch):
    """A new default in the configs (pooling, fine-tuning mode, lr) changes no cell's name or config."""
    import experiments.cells as cells

    def cells_of_every_grid():
        return {g: [(c.name, c.effective) for c in plan(g, "/tmp/unused", seeds=(0,))] for g in GRIDS}

    before = cells_of_every_grid()
    load_config = cells.load_config

    def with_new_defaults(spec):
        config = load_config(spec)
        config.model.pooling, config.model.finetune, config.train.learning_rate = "mean", "full", 1e-3
        return config

    monkeypatch.setattr(cells, "load_config", with_new_defaults)
    assert cells_of_every_grid() == before
    command = plan("rt_main", "/tmp/unused", seeds=(0,))[1].command
    assert "--config.model.pooling=cls" in command and "--config.model.finetune=lora" in command


def test_grid_sizes_and_names_are_unique():
    counts = {name: len(plan(name, "/tmp/unused")) for name in GRIDS}
    # rt_main: 3 seeds x (1 non-private + 2 methods x 3 eps); sst2_main adds full FT (3 cells) per seed.
    assert counts["rt_main"] == 21 and counts["sst2_main"] == 30
    assert counts["rt_sweep"] == 3 * (1 + 3 * 4 * 2)
    assert counts["rt_literal"] == 3 * (3 + 3)
    assert counts["rt_profile"] == 3 * (1 + 4 * 3)
    assert counts["rt_profile_paired"] == counts["sst2_profile_paired"] == 5 * (3 + 3)
    # The paired grids reuse rt_profile's and rt_main's cells when they share a root.
    paired = {c.name for c in plan("rt_profile_paired", "/tmp/unused", seeds=(0,))}
    assert "rotten_tomatoes-lora-anadp-private_profile-g-0.5-r1.5-eps3-seed0" in paired
    assert "rotten_tomatoes-lora-dp_sgd-eps8-seed0" in paired
    full = [c.name for c in plan("sst2_main", "/tmp/unused", seeds=(0,)) if "-full-" in c.name]
    assert full == ["sst2-full-non_private-learning_rate0.0001-seed0",
                    "sst2-full-dp_sgd-learning_rate0.001-eps3-seed0",
                    "sst2-full-anadp-elementwise-g0.5-r2-learning_rate0.001-eps3-seed0"]
    literal = plan("rt_literal", "/tmp/unused", seeds=(1,), only=["anadp"])
    assert [c.name for c in literal][1] == "rotten_tomatoes-lora-anadp-global-elementwise-g0.5-r2-eps3-seed1"
    assert literal[1].overrides["privacy.clipping"] == "global"
    profile = plan("rt_profile", "/tmp/unused", seeds=(0,), only=["g-0.5-r1.5"])
    assert [c.name for c in profile] == ["rotten_tomatoes-lora-anadp-private_profile-g-0.5-r1.5-eps3-seed0"]


def test_set_only_and_seeds(tmp_path, capsys):
    commands, _ = dry_run(capsys, "rt_sweep", "--seeds=4,5", "--only=group_taylor", "--only=g1-,g-0.5",
                          "--set=train.epochs=1", "--set=config.privacy.rho=3", f"--root={tmp_path}")
    # rho is part of the name: --set=privacy.rho=3 merges the rho 2 and 4 cells into one.
    assert len(commands) == 2 * 2
    for command in commands:
        assert command.split()[-2:] == ["--config.train.epochs=1.0", "--config.privacy.rho=3.0"]
        assert "group_taylor" in command and "-r3-eps3-seed" in command
        assert command.count("--config.privacy.rho=") == 1
    assert "seed4" in commands[0] and "seed5" in commands[-1]
    with pytest.raises(ValueError, match="unknown config field"):
        plan("rt_main", str(tmp_path), sets=["train.nope=1"])
    with pytest.raises(ValueError, match="integer"):
        plan("rt_main", str(tmp_path), sets=["train.steps=1.5"])


def test_commands_parse_to_the_effective_config(tmp_path, monkeypatch):
    """launch.py's own flag parsing of a cell's command gives the config the grid named it after."""
    from absl import flags
    from ml_collections import config_flags

    monkeypatch.chdir(ROOT)
    for cell in plan("sst2_main", str(tmp_path), seeds=(2,), sets=["train.steps=7", "model.dropout=true"],
                          only=["full-anadp"]) + plan("rt_literal", str(tmp_path), only=["eps8-seed1"]):
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                        sys_argv=cell.command[1:])  # defines the --config.* overrides
        flags.DEFINE_string("workdir", None, "", flag_values=values)
        values(cell.command[1:])
        assert values.config.to_dict() == cell.effective
        assert values.workdir == cell.workdir
    assert cell.effective["privacy"]["clipping"] == "global"


# --- running: skip, conflicts, failures ----------------------------------------------


def fake_summary(cell, metric_value=0.5, **changes):
    config = json.loads(json.dumps(cell.effective))
    for dotted, value in changes.items():
        group, field = dotted.split(".")
        config[group][field] = value
    p = config["privacy"]
    return {"task": config["data"]["task"], "method": p["method"], "finetune": config["model"]["finetune"],
            "model": config["model"]["name"], "epsilon": p["epsilon"], "target_epsilon": p["epsilon"],
            "noise_multiplier": 1.0, "clipping": "global", "steps": 10, "seed": config["train"]["seed"],
            "eval": {"accuracy": metric_value}, "main_metric": "accuracy", "wall_time_s": 1.0, "config": config}


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_run_grid_skips_finished_cells_and_survives_failures(tmp_path):
    root = str(tmp_path / "root")
    cells = plan("rt_main", root, seeds=(0,), only=["eps3"])
    assert [c.name.split("-")[2] for c in cells] == ["dp_sgd", "anadp"]
    cells += plan("rt_main", root, seeds=(1,), only=["eps3"])
    write_json(os.path.join(cells[0].path(), "summary.json"), fake_summary(cells[0]))  # already done
    write_json(os.path.join(cells[1].path(), "summary.json"), fake_summary(cells[1], **{"train.steps": 99}))
    launched = []

    def runner(cell, env):
        launched.append(cell.name)
        assert env["TF_CPP_MIN_LOG_LEVEL"]
        if "anadp" in cell.name:
            return 1  # a crash: no summary
        write_json(os.path.join(cell.path(), "summary.json"), fake_summary(cell, 0.7))
        return 0

    out = io.StringIO()
    status = run_grid(cells, root, runner=runner, out=out)
    assert launched == [cells[2].name, cells[3].name]
    assert status == {cells[0].name: "done", cells[1].name: "conflict", cells[2].name: "ok",
                      cells[3].name: "failed"}
    assert "train.steps: ran 99, wanted 0" in out.getvalue()
    lines = (tmp_path / "root" / "commands.txt").read_text().splitlines()
    assert [line.split("\t")[1:3] for line in lines] == [[cells[2].name, "rc=0"], [cells[3].name, "rc=1"]]
    assert lines[0].split("\t")[4] == cells[2].command_text

    launched.clear()
    status = run_grid(cells, root, runner=runner, out=io.StringIO(), parallel=2)
    assert launched == [cells[3].name]  # only the failed cell is retried
    assert status[cells[2].name] == "done"


def test_run_grid_skips_cells_another_live_process_runs(tmp_path):
    root = str(tmp_path / "root")
    busy, stale, free = plan("rt_main", root, seeds=(0,), only=["eps3,eps8"])[:3]
    os.makedirs(busy.path())
    with open(os.path.join(busy.path(), LOCK_NAME), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")  # a live process on this host
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)
    os.makedirs(stale.path())
    with open(os.path.join(stale.path(), LOCK_NAME), "w") as f:
        f.write(f"{socket.gethostname()} {finished.stdout.strip()}\n")  # its process has exited
    launched, locked_while_running = [], []

    def runner(cell, env):
        launched.append(cell.name)
        locked_while_running.append(os.path.exists(os.path.join(cell.path(), LOCK_NAME)))
        write_json(os.path.join(cell.path(), "summary.json"), fake_summary(cell, 0.7))
        return 0

    out = io.StringIO()
    status = run_grid([busy, stale, free], root, runner=runner, out=out)
    assert launched == [stale.name, free.name]
    assert locked_while_running == [True, True]
    assert status == {busy.name: "busy", stale.name: "ok", free.name: "ok"}
    assert f"busy {busy.name}" in out.getvalue()
    assert not os.path.exists(os.path.join(free.path(), LOCK_NAME))  # released when done
    assert os.path.exists(os.path.join(busy.path(), LOCK_NAME))  # the other process's lock stays


def test_dry_run_marks_done_cells(tmp_path, capsys):
    cell = plan("rt_main", str(tmp_path), seeds=(0,), only=["non_private"])[0]
    write_json(os.path.join(cell.path(), "summary.json"), fake_summary(cell))
    _, lines = dry_run(capsys, "rt_main", "--seeds=0", f"--root={tmp_path}")
    assert lines[0].startswith("# done: ") and cell.name in lines[0]
    assert lines[-1].startswith("# 7 cells, 1 done")


# --- collecting ------------------------------------------------------------------------


ACC = {  # (method, clipping, target eps) -> accuracy per seed
    ("non_private", None, None): [0.90, 0.92, 0.91],
    ("dp_sgd", "global", 1.0): [0.70, 0.74, 0.72],
    ("dp_sgd", "global", 3.0): [0.80, 0.81, 0.85],
    ("anadp", "elliptical", 3.0): [0.83, 0.82, 0.89],
    ("anadp", "global", 3.0): [0.86, 0.85],  # seeds 0, 1 only
    ("anadp", "elliptical", 1.0): [0.75, 0.70, 0.71],
}


def write_fake_runs(root):
    for (method, clipping, eps), values in ACC.items():
        for seed, value in enumerate(values):
            name = f"{method}-{clipping}-{eps}-seed{seed}"
            summary = {
                "task": "rotten_tomatoes", "method": method, "finetune": "lora", "model": "minilm-l6",
                "epsilon": float("inf") if eps is None else (eps * 7 if clipping == "global" and method == "anadp"
                                                              else eps - 0.001),
                "target_epsilon": eps, "delta": None if eps is None else 1e-5,
                "noise_multiplier": None if eps is None else 1.0 / eps, "clipping": clipping, "steps": 100,
                "seed": seed, "eval": {"accuracy": value, "loss": 0.3}, "main_metric": "accuracy",
                "wall_time_s": 10.0 + seed,
                "config": {"privacy": {"importance": "elementwise", "gamma": 0.5, "rho": 2.0},
                           "model": {"name": "minilm-l6"}},
            }
            if method == "anadp" and clipping == "global":
                summary["dp_sgd_epsilon_same_sigma"] = eps - 0.001
            with open(os.path.join(root, "commands.txt"), "a") as f:
                f.write(f"2024-01-01T00:00:00\t{name}\trc=0\t12.0s\tpython launch.py --workdir={name}\n")
            write_json(os.path.join(root, name, "summary.json"), summary)
    # A cell still running (no summary) and a checkpoint folder are ignored.
    os.makedirs(os.path.join(root, "unfinished", "checkpoints", "2"))
    with open(os.path.join(root, "anadp-elliptical-3.0-seed0", "command.txt"), "w") as f:
        f.write("python launch.py --the-exact-command\n")


def test_recipe_label_shows_the_pooling_the_run_used():
    from experiments.collect import recipe_label

    auto = {"model": {"pooling": "auto"}, "privacy": {"l2_norm_clip": 0.1}}
    assert recipe_label(auto, "mean") == "pooling=mean, l2_norm_clip=0.1"
    assert recipe_label(auto, "cls") == "l2_norm_clip=0.1"
    assert recipe_label({"model": {"pooling": "mean"}}) == "pooling=mean"  # summaries before "pooling" was recorded


def test_collect_tables_and_figure(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    write_fake_runs(str(root))
    out = tmp_path / "results" / "rt"
    assert grid.main(["collect", f"--root={root}", f"--out={out}"]) == 0

    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(v) for v in ACC.values())
    assert list(rows[0]) == CSV_COLUMNS
    for column in ["task", "finetune", "method", "clipping", "importance", "gamma", "rho", "target_epsilon",
                   "epsilon", "dp_sgd_epsilon_same_sigma", "noise_multiplier", "seed", "main_metric_value",
                   "steps", "wall_time_s", "command"]:
        assert column in rows[0]
    by_cell = {r["cell"]: r for r in rows}
    assert by_cell["anadp-elliptical-3.0-seed0"]["command"] == "python launch.py --the-exact-command"
    assert by_cell["anadp-elliptical-3.0-seed1"]["command"] == "python launch.py --workdir=anadp-elliptical-3.0-seed1"
    assert by_cell["non_private-None-None-seed0"]["importance"] == ""
    assert by_cell["non_private-None-None-seed0"]["epsilon"] == "inf"
    assert by_cell["anadp-global-3.0-seed1"]["dp_sgd_epsilon_same_sigma"] == "2.999"
    assert float(by_cell["dp_sgd-global-1.0-seed2"]["main_metric_value"]) == 0.72

    aggregates = {(a["method"], a["clipping"], a["target_epsilon"]): a
                  for a in aggregate(load_rows([str(root)]))}
    assert len(aggregates) == len(ACC)
    for key, values in ACC.items():
        a = aggregates[(key[0], key[1] or "", key[2])]
        assert a["n"] == len(values)
        assert a["mean"] == pytest.approx(statistics.mean(values))
        assert a["sd"] == pytest.approx(statistics.stdev(values))
    paired = aggregates[("anadp", "elliptical", 3.0)]
    diffs = [a - b for a, b in zip(ACC[("anadp", "elliptical", 3.0)], ACC[("dp_sgd", "global", 3.0)])]
    assert paired["n_pairs"] == 3
    assert paired["diff_mean"] == pytest.approx(statistics.mean(diffs))
    assert paired["diff_sd"] == pytest.approx(statistics.stdev(diffs))
    literal = aggregates[("anadp", "global", 3.0)]
    assert literal["n_pairs"] == 2
    assert literal["diff_mean"] == pytest.approx(statistics.mean([0.86 - 0.80, 0.85 - 0.81]))
    assert literal["epsilon_mean"] == pytest.approx(21.0)
    assert aggregates[("anadp", "elliptical", 1.0)]["diff_mean"] == pytest.approx(
        statistics.mean([0.05, -0.04, -0.01]))
    assert aggregates[("dp_sgd", "global", 3.0)]["n_pairs"] == 0

    md = open(f"{out}.md").read()
    assert f"{100 * statistics.mean(diffs):.2f} ± {100 * statistics.stdev(diffs):.2f}" in md
    assert f"{100 * statistics.mean([0.90, 0.92, 0.91]):.2f} ± {100 * statistics.stdev([0.90, 0.92, 0.91]):.2f}" in md
    assert "| 21 (3) |" in md  # the literal variant's spent epsilon, DP-SGD's claim in parentheses
    assert md.count("| rotten_tomatoes |") == len(ACC)
    assert os.path.getsize(f"{out}_accuracy_vs_epsilon.png") > 5000


def test_collect_grid_filter_allocation_columns_and_sweep_figure(tmp_path):
    """Grids sharing a root are told apart; ANADP's final allocation is read from metrics.jsonl."""
    root = str(tmp_path / "shared")
    sweep = plan("rt_sweep", root, seeds=(0, 1), only=["dp_sgd,elementwise"])
    sweep = [c for c in sweep if "-r4-" not in c.name]  # DP-SGD and elementwise at rho 2, 4 gammas
    other = plan("rt_profile", root, seeds=(0,), only=["private_profile-g1-r2"])
    assert len(sweep) == 10 and len(other) == 1
    for i, cell in enumerate(sweep + other):
        summary = fake_summary(cell, 0.70 + 0.01 * i)
        summary["clipping"] = "elliptical"
        write_json(os.path.join(cell.path(), "summary.json"), summary)
        if "anadp" in cell.name:
            with open(os.path.join(cell.path(), "metrics.jsonl"), "w") as f:
                for step, low in ((5, 0.5), (10, 0.8)):  # the last record counts
                    f.write(json.dumps({"step": step, "noise_scales": {"a": low, "b": 1.0 + i / 100},
                                        "importance_weight_corr": step / 20}) + "\n")

    out = str(tmp_path / "results" / "rt_sweep")
    assert grid.main(["collect", f"--root={root}", "--grid=rt_sweep", f"--out={out}"]) == 0
    with open(f"{out}.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert set(rows) == {c.name for c in sweep}  # the rt_profile cell is left out
    anadp = [c for c in sweep if "anadp" in c.name][0]
    assert float(rows[anadp.name]["importance_weight_corr"]) == 0.5
    assert float(rows[anadp.name]["noise_scale_min"]) == 0.8
    assert rows[sweep[0].name]["noise_scale_min"] == ""  # DP-SGD has no allocation
    md = open(f"{out}.md").read()
    assert "| 0.50 |" in md and "rt_sweep_sweep.png" in md
    assert os.path.getsize(f"{out}_sweep.png") > 5000

    # Without --grid every cell counts; a root without a gamma sweep draws no sweep figure.
    everything = collect([root], str(tmp_path / "all"))
    assert sum(a["n"] for a in everything) == 11
    single = str(tmp_path / "single")
    for cell in other:
        write_json(os.path.join(single, cell.name, "summary.json"), fake_summary(cell))
    collect([single], str(tmp_path / "one"))
    assert not os.path.exists(tmp_path / "one_sweep.png")
    with pytest.raises(ValueError, match="unknown grid"):
        collect([root], str(tmp_path / "x"), ["rt_nope"])


def test_collect_errors(tmp_path, capsys):
    assert grid.main(["collect", f"--root={tmp_path / 'missing'}", f"--out={tmp_path / 'x'}"]) == 2
    (tmp_path / "empty").mkdir()
    assert grid.main(["collect", f"--root={tmp_path / 'empty'}", f"--out={tmp_path / 'x'}"]) == 2
    assert "no summary.json" in capsys.readouterr().err


# --- heatmap ---------------------------------------------------------------------------


def test_heatmap_from_metrics(tmp_path):
    run = tmp_path / "rotten_tomatoes-lora-anadp-eps3-seed0"
    groups = [f"encoder/layer_{i}/attention/{m}/lora_{ab}" for i in range(2) for m in ("query", "value")
              for ab in "ab"] + ["classifier/kernel", "classifier/bias"]
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for step in (10, 20, 30):
            f.write(json.dumps({"step": step, "eval": {"validation": {"accuracy": 0.5}},
                                "noise_scales": {g: 0.5 + 0.1 * i + step / 100 for i, g in enumerate(groups)},
                                "importance": {g: float(i) for i, g in enumerate(groups)}}) + "\n")
            f.write(json.dumps({"step": step + 1}) + "\n")  # a record without an evaluation
    write_json(str(run / "config.json"), {"data": {"task": "rotten_tomatoes"},
                                          "privacy": {"method": "anadp", "importance": "elementwise"}})
    paths = heatmap.draw(str(run), step=20)
    assert [os.path.basename(p) for p in paths] == ["noise_scales.png", "noise_scales_over_time.png"]
    assert all(os.path.getsize(p) > 3000 for p in paths)
    assert heatmap.main([f"--workdir={run}", f"--out={tmp_path / 'figs'}", "--importance"]) == 0
    assert sorted(os.listdir(tmp_path / "figs")) == [
        f"{run.name}_{x}.png" for x in ("importance_over_time", "noise_scales", "noise_scales_over_time")]
    empty = tmp_path / "dp_sgd_run"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval": {}}) + "\n")
    assert heatmap.main([f"--workdir={empty}"]) == 2


# --- benchmark ---------------------------------------------------------------------


def test_benchmark_writes_every_method_and_counts_resident_state(tmp_path):
    """The benchmark's JSON and table, on tiny-bert (no timing is asserted)."""
    import subprocess

    out = tmp_path / "bench.json"
    # compare_pytorch.py's JSON as it would be for the same shapes (made up here: torch
    # is never needed by the tests); the benchmark prints its own step over PyTorch's.
    pytorch = tmp_path / "pytorch.json"
    pytorch.write_text(json.dumps({
        "pytorch_eager_non_private": {"step_time_s": 0.5}, "opacus_ghost_dp_sgd": {"step_time_s": 2.0},
        "_meta": {"args": {"model": "tiny-bert", "batch_size": 4, "seq_len": 8}, "torch": "x", "opacus": "y"}}))
    args = [sys.executable, os.path.join(ROOT, "experiments", "benchmark.py"), "--model=tiny-bert",
            "--batch_size=4", "--seq_len=8", "--finetune=full", "--microbatch_size=2", "--engine=ghost",
            "--logical_batch_size=8", "--repeats=1", f"--out={out}", f"--pytorch_json={pytorch}"]
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT, timeout=600)
    results = json.loads(out.read_text())
    table = (tmp_path / "bench.md").read_text()
    for ours, theirs, seconds in (("non_private", "pytorch_eager_non_private", 0.5),
                                  ("dp_sgd", "opacus_ghost_dp_sgd", 2.0)):
        ratio = results[ours]["step_time_s"] / seconds
        assert f"| {ours} | {results[ours]['step_time_s']:.3f} | {theirs} | {seconds:.3f} | {ratio:.2f}x |" in table
    for method in ("non_private", "dp_sgd", "anadp"):
        for key in ("step_time_s", "compile_time_s", "peak_memory_bytes", "time_per_example_s"):
            assert results[method][key] > 0, (method, key)
    assert results["_meta"]["args"]["logical"] == 8
    # ANADP's elementwise EMAs (two trees the size of the trainable params) stay
    # resident during each pass, so its peak must exceed DP-SGD's by at least that.
    two_emas = 2 * 4 * results["_meta"]["num_trainable_params"]
    assert results["anadp"]["peak_memory_bytes"] >= results["dp_sgd"]["peak_memory_bytes"] + two_emas
    assert "| anadp |" in table


def test_benchmark_refuses_a_pytorch_json_of_other_shapes(tmp_path):
    import subprocess

    pytorch = tmp_path / "pytorch.json"
    pytorch.write_text(json.dumps({"_meta": {"args": {"model": "tiny-bert", "batch_size": 32, "seq_len": 8}}}))
    args = [sys.executable, os.path.join(ROOT, "experiments", "benchmark.py"), "--model=tiny-bert",
            "--batch_size=4", "--seq_len=8", "--finetune=full", f"--out={tmp_path / 'b.json'}",
            f"--pytorch_json={pytorch}"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode != 0
    assert "batch_size is 32, this run's 4" in done.stderr
    assert not (tmp_path / "b.json").exists()


def test_profile_step_attributes_the_pass_to_operation_kinds(tmp_path):
    """profile_step.py on tiny-bert: every traced thunk is attributed to a kind, the
    matrix products are found, and the shares add up (no timing is asserted)."""
    import subprocess

    table = tmp_path / "profile.md"
    args = [sys.executable, os.path.join(ROOT, "experiments", "profile_step.py"), "--model=tiny-bert",
            "--batch_size=4", "--seq_len=8", "--engine=ghost", "--method=dp_sgd", "--steps=1", f"--table={table}"]
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT, timeout=300)
    rows = [line.split("|")[1:-1] for line in table.read_text().splitlines() if line.startswith("| ")]
    shares = {kind.strip(): float(share.strip().rstrip("%")) for kind, _, share in rows[1:-1]}
    assert shares["matrix products"] > 0
    assert abs(sum(shares.values()) - 100) < 0.5
    assert rows[-1][0].strip() == "all operations"


def test_recipe_figure_takes_each_series_at_its_full_length_and_learning_rate():
    from experiments import recipe_figure

    def setting(finetune, eps, steps, lr, settings="pooling=mean", method="dp_sgd"):
        return {"finetune": finetune, "method": method, "settings": settings, "target_epsilon": eps,
                "steps": steps, "learning_rate": lr}

    aggregates = [setting("full", 3.0, 90, 1e-3), setting("full", 1.0, 90, 1e-3), setting("full", 3.0, 22, 1e-3),
                  setting("full", 3.0, 90, 5e-4), setting("full", 3.0, 90, 1e-3, settings=""),
                  setting("full", None, 90, 1e-4, method="non_private")]
    points = recipe_figure.series_points(aggregates, "full", "dp_sgd", "pooling=mean", 1e-3)
    assert [(p["target_epsilon"], p["steps"], p["learning_rate"]) for p in points] == [(1.0, 90, 1e-3), (3.0, 90, 1e-3)]
    assert len(recipe_figure.series_points(aggregates, "full", "dp_sgd", "pooling=mean", None)) == 3
    assert recipe_figure.series_points(aggregates, "lora", "dp_sgd", "", None) == []


# --- analysis: by-step paired differences, allocation spread ---------------------------


def write_run(root, name, method, seed, curve, gamma=None, scales=None, learning_rate=1e-2):
    """A finished fake run: summary.json (final value = the curve's last) and metrics.jsonl."""
    summary = {
        "task": "rotten_tomatoes", "model": "minilm-l6", "finetune": "lora", "method": method,
        "clipping": "elliptical" if method == "anadp" else "global", "target_epsilon": 3.0, "epsilon": 3.0,
        "noise_multiplier": 0.9, "seed": seed, "steps": 60, "main_metric": "accuracy",
        "eval": {"accuracy": curve[max(curve)]},
        "config": {"privacy": {"importance": "elementwise", "gamma": gamma, "rho": 2.0},
                   "train": {"learning_rate": learning_rate}},
    }
    write_json(os.path.join(root, name, "summary.json"), summary)
    with open(os.path.join(root, name, "metrics.jsonl"), "w") as f:
        for step, value in sorted(curve.items()):
            record = {"step": step, "eval": {"validation": {"accuracy": value}}}
            if scales:
                record["noise_scales"] = {"a": scales[0], "b": scales[1]}
            f.write(json.dumps(record) + "\n")


def test_analysis_by_step_differences_and_allocation_spread(tmp_path):
    root = str(tmp_path / "root")
    write_run(root, "dp-seed0", "dp_sgd", 0, {30: 0.60, 60: 0.70})
    write_run(root, "dp-seed1", "dp_sgd", 1, {30: 0.62, 60: 0.74})
    write_run(root, "a-seed0", "anadp", 0, {30: 0.61, 60: 0.72}, gamma=0.5, scales=(0.8, 1.2))  # ratio 1.5
    write_run(root, "a-seed1", "anadp", 1, {30: 0.60, 60: 0.70}, gamma=0.5, scales=(0.8, 1.28))  # 1.6
    write_run(root, "b-seed0", "anadp", 0, {60: 0.65}, gamma=1.0, scales=(0.5, 1.5))  # 3.0
    write_run(root, "d-seed1", "anadp", 1, {60: 0.60}, gamma=-0.5, scales=(0.2, 1.0))  # 5.0
    write_run(root, "c-seed0", "anadp", 0, {60: 0.10}, gamma=0.0, scales=(1.0, 1.0))  # uniform: not counted
    rows = load_rows([root])
    curves = analysis.by_step(rows)
    a = next(v for k, v in curves.items() if "γ=0.5" in k[4])
    assert a["level"][60][0] == pytest.approx(0.71)
    assert a["diff"][30][:2] == pytest.approx((-0.005, statistics.stdev([0.01, -0.02])))
    assert a["diff"][60] == pytest.approx((-0.01, statistics.stdev([0.02, -0.04]), 2))
    b = next(v for k, v in curves.items() if "γ=1" in k[4])
    assert list(b["diff"]) == [60] and b["diff"][60][2] == 1  # only the step it evaluated

    spread = analysis.allocation_spread(rows)
    assert [cell for _, _, cell in spread["points"]] == ["a-seed0", "a-seed1", "b-seed0", "d-seed1"]
    assert spread["rho"] == pytest.approx(-1.0)  # larger ratio, larger loss, in every pair
    two_settings = [r for r in rows if not r["cell"].startswith("b-")]
    assert analysis.allocation_spread(two_settings) is None  # too few settings to correlate

    out = str(tmp_path / "out" / "x")
    assert analysis.main([f"--root={root}", f"--out={out}"]) == 0
    text = open(out + "_by_step.md").read()
    assert "| -0.50 ± 2.12 (2) | -1.00 ± 4.24 (2) |" in text and "= -1.00" in text
    assert os.path.getsize(out + "_by_step.png") > 0
    assert analysis.main([f"--root={root}", "--seeds=7", f"--out={out}"]) == 2  # nothing matches


def test_runs_differing_only_in_learning_rate_are_separate_settings_and_pair_within_their_rate(tmp_path):
    """A rerun at a new learning rate neither replaces the old run's seed nor is paired with it."""
    root = str(tmp_path / "root")
    write_run(root, "dp-lr1e-4-seed0", "dp_sgd", 0, {60: 0.50}, learning_rate=1e-4)
    write_run(root, "a-lr1e-4-seed0", "anadp", 0, {60: 0.51}, gamma=0.5, learning_rate=1e-4)
    write_run(root, "dp-lr1e-3-seed0", "dp_sgd", 0, {60: 0.79}, learning_rate=1e-3)
    write_run(root, "a-lr1e-3-seed0", "anadp", 0, {60: 0.80}, gamma=0.5, learning_rate=1e-3)
    rows = load_rows([root])
    assert len(rows) == 4  # none dropped as a repeat of another seed 0
    aggregates = {(a["method"], a["learning_rate"]): a for a in aggregate(rows)}
    assert len(aggregates) == 4
    assert aggregates[("dp_sgd", 1e-3)]["mean"] == pytest.approx(0.79)
    assert aggregates[("anadp", 1e-4)]["diff_mean"] == pytest.approx(0.01)
    assert aggregates[("anadp", 1e-3)]["diff_mean"] == pytest.approx(0.01)
    curves = analysis.by_step(rows)
    assert sorted(k[7] for k in curves if k[3] == "anadp") == [1e-4, 1e-3]
    assert all(c["diff"][60][0] == pytest.approx(0.01) for k, c in curves.items() if k[3] == "anadp")
