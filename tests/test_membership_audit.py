"""experiments/membership_audit.py (and its membership_data.py): the canary CSVs, the claims and bounds of a row, and
the tiny pipeline end to end (two tiny-bert runs of two steps)."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    path = os.path.join(ROOT, "experiments", "membership_audit.py")
    spec = importlib.util.spec_from_file_location("experiments_membership_audit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ma = _load()  # it puts the repository on sys.path

from experiments import membership_data  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return membership_data.task_splits()


def build(splits, **overrides):
    train, dev, num_labels = splits
    settings = dict(num_canaries=50, canary_length=8, repeats=1, canary_seed=7, inclusion_seed=8, train_rows=300)
    settings.update(overrides)
    return membership_data.build_audit_data(train, dev, num_labels, **settings)


def read_csv_rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["text", "label"]
        return [(text, int(label)) for text, label in reader]


# --- the data -------------------------------------------------------------------------


@pytest.mark.parametrize("repeats", [1, 3])
def test_included_canaries_are_in_train_csv_repeats_times_and_dev_is_the_tasks(tmp_path, splits, repeats):
    from anadp.data import UserFiles, read_user_task

    data = build(splits, repeats=repeats)
    paths = membership_data.write_audit_data(str(tmp_path), data)
    train_rows = read_csv_rows(paths["train.csv"])
    task_train, task_dev, _ = splits
    assert train_rows[:300] == task_train[:300]  # the task's rows first, unchanged
    counts = {c: train_rows.count(c) for c in data.canaries}
    for canary, included in zip(data.canaries, data.included):
        assert counts[canary] == (repeats if included else 0), canary
    assert len(train_rows) == 300 + repeats * int(data.included.sum())
    assert 0 < data.included.sum() < len(data.canaries)

    dev_rows = read_csv_rows(paths["dev.csv"])
    assert dev_rows == task_dev
    canary_texts = {t for t, _ in data.canaries}
    assert not canary_texts & {t for t, _ in dev_rows}

    record = json.loads(open(paths["canaries.json"], encoding="utf-8").read())
    assert record["canary_repeats"] == repeats and record["num_canaries"] == 50
    assert [c["included"] for c in record["canaries"]] == data.included.tolist()
    assert (record["canary_seed"], record["inclusion_seed"]) == (7, 8)

    # Training reads the files as the task's labels, ids unchanged.
    parsed, classes = read_user_task("csv", UserFiles(paths["train.csv"], paths["dev.csv"]))
    assert classes == ("0", "1")
    assert parsed["validation"]["label"].tolist() == [y for _, y in task_dev]


def test_canary_draw_is_deterministic_in_its_seeds(splits):
    first, again = build(splits), build(splits)
    assert first.record == again.record and first.train == again.train
    other_canaries = build(splits, canary_seed=9)
    assert {t for t, _ in other_canaries.canaries}.isdisjoint({t for t, _ in first.canaries})
    assert other_canaries.included.tolist() == first.included.tolist()  # bits have their own seed
    other_bits = build(splits, inclusion_seed=9)
    assert other_bits.canaries == first.canaries
    assert other_bits.included.tolist() != first.included.tolist()


def test_vocabulary_is_words_of_the_given_texts():
    words = membership_data.canary_vocabulary(["A film's 2 hours , 'fine' film", "b ok"])
    assert words == ["film", "fine", "hours", "ok"]


def test_other_settings_into_the_same_out_are_refused(tmp_path, splits):
    membership_data.write_audit_data(str(tmp_path), build(splits))
    membership_data.write_audit_data(str(tmp_path), build(splits))  # the same data: kept
    with pytest.raises(ValueError, match="canaries.json holds other audit data"):
        membership_data.write_audit_data(str(tmp_path), build(splits, repeats=2))


def test_bad_settings_name_the_value(splits):
    with pytest.raises(ValueError, match="canary_repeats=0"):
        build(splits, repeats=0)
    with pytest.raises(ValueError, match="train_rows=99999"):
        build(splits, train_rows=99999)
    with pytest.raises(ValueError, match="no row named dp_sgd_eps2"):
        ma.selected_rows(ma.PLAN, "non_private,dp_sgd_eps2")
    with pytest.raises(ValueError, match=r"\[15\]"):
        ma.guess_counts(100, [20, 15])


# --- claims and bounds ----------------------------------------------------------------


def test_plan_rows_and_their_flags():
    names = [r.name for r in ma.PLAN]
    assert names == ["non_private", "dp_sgd_eps1", "dp_sgd_eps3", "dp_sgd_eps8",
                     "anadp_eps1", "anadp_eps3", "anadp_eps8", "anadp_global_eps3"]
    literal = ma.PLAN[-1].config_flags()
    assert "--config.privacy.clipping=global" in literal and "--config.privacy.epsilon=3" in literal
    assert [r.name for r in ma.TINY_PLAN] == ["non_private", "dp_sgd_eps3"]


def test_rows_train_the_audited_recipe_whatever_the_default(tmp_path):
    # The committed table ran LoRA with the [CLS] pooler at lr 1e-2 (the default of
    # its commit); configs/default.py has moved since, and the pin keeps the audit.
    args = ma.parse_args([f"--out={tmp_path}"])
    for row in ma.PLAN:
        config = ma.config_for_command(ma.launch_command(row, str(tmp_path), args))
        assert config["model"]["finetune"] == "lora" and config["model"]["pooling"] == "cls", row.name
        assert config["train"]["learning_rate"] == pytest.approx(2e-3 if row.method == "non_private" else 1e-2)
        assert config["privacy"]["method"] == row.method
    # --extra comes last, so it changes every row's recipe.
    args = ma.parse_args([f"--out={tmp_path}", "--extra=--config.model.finetune=full"])
    assert ma.config_for_command(ma.launch_command(ma.PLAN[2], str(tmp_path), args))["model"]["finetune"] == "full"


def test_a_finished_row_is_reused_only_with_the_same_config(tmp_path):
    args = ma.parse_args([f"--out={tmp_path}"])
    row = ma.PLAN[2]  # dp_sgd_eps3
    command = ma.launch_command(row, str(tmp_path), args)
    ran = ma.config_for_command(command)
    # The same config spelled with fewer flags (a pinned value that is the default here),
    # and other CSV paths (another checkout): reused.
    ran_elsewhere = json.loads(json.dumps(ran))
    ran_elsewhere["data"]["train_file"] = "/elsewhere/train.csv"
    ma.check_same_config(row, command, {"config": ran_elsewhere})
    ma.check_same_config(row, [a for a in command if a != "--config.model.pooling=cls"],
                         {"config": {**ran, "model": {**ran["model"], "pooling": "auto"}}})
    other = json.loads(json.dumps(ran))
    other["model"]["finetune"] = "full"
    with pytest.raises(ValueError, match="row dp_sgd_eps3 finished with another config.*model.finetune: ran 'full'"):
        ma.check_same_config(row, command, {"config": other})


def test_guess_counts_stop_at_m():
    assert ma.guess_counts(20, []) == [20]
    assert ma.guess_counts(1000, []) == [20, 50, 100, 200, 500, 1000]
    assert ma.guess_counts(301, []) == [20, 50, 100, 200, 300]


def test_group_privacy_is_the_textbook_bound():
    assert ma.group_privacy(2.0, 1e-5, 1) == (2.0, 1e-5)
    eps, delta = ma.group_privacy(2.0, 1e-5, 3)
    assert eps == 6.0 and delta == pytest.approx(3 * math.exp(4.0) * 1e-5)
    assert ma.group_privacy(100.0, 1e-5, 2) == (200.0, 1.0)  # vacuous delta, no overflow
    assert ma.group_privacy(math.inf, 1e-5, 4)[0] == math.inf


def _summary(method="dp_sgd", epsilon=0.5):
    return {"method": method, "clipping": "global", "target_epsilon": epsilon, "epsilon": epsilon, "delta": 1e-5,
            "noise_multiplier": 2.0, "steps": 10, "num_train": 1000, "randomness": "seeded",
            "eval": {"accuracy": 0.8}}


def test_audit_row_flags_a_bound_above_the_claim():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    perfect = included + 0.01 * rng.random(1000)  # every member above every non-member
    row = ma.audit_row(ma.PLAN[1], _summary(), perfect, included, ks=[100, 1000], confidence=0.95, repeats=1)
    assert row["auc"] == 1.0 and row["correct"] == row["guesses"]
    assert row["epsilon_lower_bound"] > 0.5 and row["bound_exceeds_claim"] is True
    # As a group of 3 rows the claim is 3 times epsilon at a larger delta, which the bound uses (so it is smaller).
    grouped = ma.audit_row(ma.PLAN[1], _summary(), perfect, included, ks=[100, 1000], confidence=0.95, repeats=3)
    assert grouped["canary_epsilon"] == 1.5
    assert grouped["bound_delta"] == pytest.approx(3 * math.exp(1.0) * 1e-5)
    assert 1.5 < grouped["epsilon_lower_bound"] < row["epsilon_lower_bound"]
    # A delta too large for the theorem gives no bound rather than a wrong one.
    vacuous = ma.audit_row(ma.PLAN[1], _summary(epsilon=8.0), perfect, included, ks=[1000], confidence=0.95,
                           repeats=2)
    assert math.isnan(vacuous["epsilon_lower_bound"]) and vacuous["bound_exceeds_claim"] is None
    # Non-private: no claim to compare with.
    free = ma.audit_row(ma.PLAN[0], {**_summary("non_private"), "epsilon": math.inf, "delta": None}, perfect,
                        included, ks=[1000], confidence=0.95, repeats=1)
    assert free["bound_delta"] == 1e-5 and free["bound_exceeds_claim"] is None


# --- end to end -----------------------------------------------------------------------


def test_tiny_pipeline_end_to_end(tmp_path):
    out = tmp_path / "audit"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", ANADP_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "membership_audit.py"), "--tiny", f"--out={out}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr

    with open(out / "membership_audit.csv", encoding="utf-8", newline="") as f:
        rows = {r["row"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"non_private", "dp_sgd_eps3"}
    for r in rows.values():
        assert 0.0 <= float(r["auc"]) <= 1.0
        assert 0.0 <= float(r["tpr_at_1pct_fpr"]) <= 1.0
        assert float(r["epsilon_lower_bound"]) >= 0.0
        assert int(r["num_canaries"]) == 20 and r["randomness"] == "seeded"
        assert "launch.py" in r["command"] and len(r["commit"]) >= 7
    dp = rows["dp_sgd_eps3"]
    assert float(dp["reported_epsilon"]) == pytest.approx(3.0, abs=1e-3)
    assert float(dp["epsilon_lower_bound"]) < float(dp["reported_epsilon"])
    assert dp["bound_exceeds_claim"] == "False"
    table = (out / "membership_audit.md").read_text(encoding="utf-8")
    assert "`dp_sgd_eps3`" in table and "`non_private`" in table and "Git commit" in table
    scores = json.loads((out / "runs" / "dp_sgd_eps3" / "canary_scores.json").read_text())["scores"]
    assert len(scores) == 20 and all(s <= 0 for s in scores)  # log-probabilities

    # Resumable: a second call trains nothing and rewrites the same table.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "non_private: finished, skipped" in again.stdout and ": training ..." not in again.stdout
