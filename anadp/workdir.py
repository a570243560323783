"""A run's files in its workdir, apart from the checkpoints (`anadp.checkpoint`).

    config.json       the resolved config (a rerun with another config is refused)
    labels.json       the class names, index = class id (a JSON list of strings)
    metrics.jsonl     one JSON object per logged step (`RunLog`)
    tensorboard/      the same public metrics as TensorBoard event files (`TensorBoardLog`)
    summary.json      final metrics, epsilon, delta, steps, wall time, versions
    *.png             training curves; for ANADP the noise-scale heatmaps

`FreshPaths` takes away what a run added when it fails before its first step.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections

from anadp import sharding

LABELS_FILE = "labels.json"


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Creates the workdir, checks it is writable, and refuses one that holds another config."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")  # one per host
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"workdir={workdir!r} is not writable: {e}") from None
    path = os.path.join(workdir, "config.json")
    resolved = json.loads(config.to_json())
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != resolved:
            diffs = _config_differences(previous, resolved)
            raise ValueError(
                f"workdir={workdir!r} holds a run with a different config ({'; '.join(diffs[:5])}); "
                "use a new workdir, or the same config to resume"
            )


def write_config(workdir: str, config: ml_collections.ConfigDict, label_names: tuple[str, ...]) -> None:
    """config.json and labels.json (the class names, index = class id), written
    once the run has set up (a failed start leaves neither behind)."""
    if not sharding.is_main_process():
        return
    for name, content in (("config.json", json.loads(config.to_json())), (LABELS_FILE, list(label_names))):
        path = os.path.join(workdir, name)
        if not os.path.exists(path):
            write_json(path, content)


def check_same_labels(workdir: str, label_names: tuple[str, ...]) -> None:
    """Refuses to resume a run whose data now has other classes (an edited train file)."""
    path = os.path.join(workdir, LABELS_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f)
    if previous != list(label_names):
        raise ValueError(
            f"workdir={workdir!r} holds a run trained on the classes {previous}; the data now has "
            f"{list(label_names)}: use a new workdir"
        )


class FreshPaths:
    """What a run adds to its workdir, so that a run failing before its first
    step can take exactly that away again: the corrected command then starts as
    on a clean workdir instead of being refused as "a different config".

    Nothing is released before the first step, so nothing is lost: the step-0
    checkpoint holds the initial state and the secrets, which the next run draws
    afresh. Only process 0 removes (it alone writes the workdir's files)."""

    OUTPUTS = ("config.json", LABELS_FILE, "metrics.jsonl", "checkpoints", "tensorboard")

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.new_folders = []  # the workdir and the parents it will need, deepest first
        path = self.workdir
        while not os.path.lexists(path) and os.path.dirname(path) != path:
            self.new_folders.append(path)
            path = os.path.dirname(path)
        self.new_outputs = [n for n in self.OUTPUTS if not os.path.lexists(os.path.join(self.workdir, n))]
        self.kept = False

    def keep(self) -> None:
        """From now on the workdir holds a run worth resuming."""
        self.kept = True

    def remove(self) -> None:
        if self.kept or not sharding.is_main_process():
            return
        for name in self.new_outputs:
            path = os.path.join(self.workdir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
        for folder in self.new_folders:
            try:
                os.rmdir(folder)
            except FileNotFoundError:
                continue
            except OSError:  # not empty: something else was put there
                break


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return diffs


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def write_summary(workdir: str, summary: dict, records: list[dict]) -> None:
    """summary.json and the run's figures (process 0 only)."""
    if not sharding.is_main_process():
        return
    write_json(os.path.join(workdir, "summary.json"), summary)
    from anadp import plots

    plots.plot_run(workdir, records, summary)


class RunLog:
    """metrics.jsonl, rewritten on resume so that it never holds steps past the checkpoint."""

    def __init__(self, path: str, resume_step: int):
        self.path = path
        self.records: list[dict] = []
        if os.path.exists(path):
            with open(path) as f:
                self.records = [json.loads(line) for line in f if line.strip()]
            self.records = [r for r in self.records if r["step"] <= resume_step]
        if sharding.is_main_process():
            with open(path, "w") as f:
                for r in self.records:
                    f.write(json.dumps(r) + "\n")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if sharding.is_main_process():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def tensorboard_scalars(record: dict, include_nonprivate: bool = False) -> dict[str, float]:
    """The scalars of a metrics.jsonl record under TensorBoard tags: ``<split>/<metric>``
    for the dev metrics, the record's own key for epsilon and the other top-level
    numbers. Keys marked ``nonprivate/`` only with ``include_nonprivate``; the
    per-group dicts (noise scales, importance) stay in metrics.jsonl and the figures."""
    scalars = {}
    for split, metrics in record.get("eval", {}).items():
        for name, value in metrics.items():
            scalars[f"{split}/{name}"] = float(value)
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith("nonprivate/") and not include_nonprivate:
            continue
        scalars[key] = float(value)
    return scalars


class TensorBoardLog:
    """``tensorboard/``: event files with the scalars of metrics.jsonl (tensorboardX,
    no TensorFlow). The writer is opened at the first record, so a run that logs
    nothing leaves no folder; a resumed run tells TensorBoard to drop what an
    interrupted run logged after its checkpoint (``purge_step``), as metrics.jsonl
    is cut back."""

    def __init__(self, folder: str, resume_step: int, include_nonprivate: bool):
        self.folder, self.resume_step, self.include_nonprivate = folder, resume_step, include_nonprivate
        self.writer = None

    def write(self, record: dict) -> None:
        if not sharding.is_main_process():
            return
        if self.writer is None:
            from tensorboardX import SummaryWriter

            purge_step = self.resume_step + 1 if self.resume_step > 0 else None
            self.writer = SummaryWriter(self.folder, purge_step=purge_step)
        for tag, value in tensorboard_scalars(record, self.include_nonprivate).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()  # a killed run keeps every record it logged

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
