"""The membership audit's data (experiments/membership_audit.py): the task's rows plus the canaries.

Canaries are sentences of random words from the public dev split, each with a
random label, each included in training independently with probability 1/2;
the included ones are appended (R times each) to the rotten_tomatoes task's
train rows and handed to launch.py as a CSV task.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re

import numpy as np

from anadp import audit_one_run as aor
from anadp.data import get_task, read_movie_reviews

TASK = "rotten_tomatoes"


@dataclasses.dataclass(frozen=True)
class AuditData:
    train: list[tuple[str, int]]  # the task's rows, then each included canary `repeats` times
    dev: list[tuple[str, int]]
    canaries: list[tuple[str, int]]
    included: np.ndarray  # bool [m]
    record: dict  # what canaries.json holds


def task_splits() -> tuple[list[tuple[str, int]], list[tuple[str, int]], int]:
    """(train rows, dev rows, number of labels) of the `rotten_tomatoes` task, from its own reader and split."""
    spec = get_task(TASK)
    splits = read_movie_reviews(spec)

    def rows(split):
        return [(text, int(label)) for text, label in zip(splits[split]["text"], splits[split]["label"])]

    return rows("train"), rows("validation"), spec.num_labels


def canary_vocabulary(texts) -> list[str]:
    """Distinct lower-case words (2+ letters) of `texts`, sorted so the canaries depend on the seed alone."""
    return sorted({w for text in texts for w in re.findall(r"[a-z]{2,}", text.lower())})


def build_audit_data(
    train: list[tuple[str, int]],
    dev: list[tuple[str, int]],
    num_labels: int,
    *,
    num_canaries: int,
    canary_length: int,
    repeats: int,
    canary_seed: int,
    inclusion_seed: int,
    train_rows: int = 0,
) -> AuditData:
    """The audit's training and dev rows: `train` (its first `train_rows`, 0: all) plus the included canaries.

    The vocabulary is the dev split's (public: its metrics are released anyway),
    so the canaries reveal nothing about the training rows. Included canaries go
    after the task's rows: Poisson sampling makes the order irrelevant.
    """
    if repeats < 1:
        raise ValueError(f"canary_repeats={repeats} must be >= 1")
    if train_rows < 0 or train_rows > len(train):
        raise ValueError(f"train_rows={train_rows} must be in [0, {len(train)}] (0: all of the task's train split)")
    task_rows = train[:train_rows] if train_rows else list(train)
    canaries = aor.make_canaries(num_canaries, canary_vocabulary(t for t, _ in dev),
                                 length=canary_length, num_labels=num_labels, seed=canary_seed)
    # A canary equal to a real row would be "included" whatever its bit says.
    real_texts = {t for t, _ in task_rows} | {t for t, _ in dev}
    clashes = [t for t, _ in canaries if t in real_texts]
    if clashes:
        raise ValueError(f"{len(clashes)} canaries equal a task row (first: {clashes[0]!r}); "
                         f"use a longer canary_length than {canary_length} or another canary_seed")
    included = aor.draw_inclusion(num_canaries, seed=inclusion_seed)
    planted = [c for c, inc in zip(canaries, included) if inc for _ in range(repeats)]
    record = {
        "task": TASK,
        "num_canaries": num_canaries,
        "canary_length": canary_length,
        "canary_repeats": repeats,
        "canary_seed": canary_seed,
        "inclusion_seed": inclusion_seed,
        "vocabulary": "lower-case words of 2+ letters of the dev split",
        "task_train_rows": len(task_rows),
        "train_rows": len(task_rows) + len(planted),
        "dev_rows": len(dev),
        "num_included": int(included.sum()),
        "canaries": [{"index": i, "text": t, "label": y, "included": bool(inc)}
                     for i, ((t, y), inc) in enumerate(zip(canaries, included))],
    }
    return AuditData(task_rows + planted, list(dev), canaries, included, record)


def csv_text(rows: list[tuple[str, int]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    return buffer.getvalue()


def write_or_check(path: str, content: str) -> None:
    """Writes `content` to `path`, or checks that the file already there holds exactly it.

    Runs already trained on an older file would otherwise be mixed with new canaries.
    """
    if os.path.exists(path):
        with open(path, encoding="utf-8", newline="") as f:
            if f.read() == content:
                return
        raise ValueError(f"{path} holds other audit data than these settings make "
                         "(canaries, seeds, repeats or train_rows changed); use another --out")
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(content)


def write_audit_data(out: str, data: AuditData) -> dict[str, str]:
    paths = {name: os.path.join(out, name) for name in ("train.csv", "dev.csv", "canaries.json")}
    os.makedirs(out, exist_ok=True)
    write_or_check(paths["canaries.json"], json.dumps(data.record, indent=1) + "\n")
    write_or_check(paths["train.csv"], csv_text(data.train))
    write_or_check(paths["dev.csv"], csv_text(data.dev))
    return paths
