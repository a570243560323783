"""A run's inputs from its config: the task (tokenised), its delta, and the model
with its parameters split (trainable, frozen). A missing folder or file, or an
unreachable hub, is the one-line error of the setting that named it."""

from __future__ import annotations

import contextlib
from typing import Any

import ml_collections

from anadp import accounting, models
from anadp import data as data_lib
from anadp.workdir import check_same_labels


def lora_config(model_config) -> models.LoraConfig | None:
    """The adapters `config.model` asks for: a LoraConfig for finetune="lora", else None.

    Item access, so it reads a ConfigDict and the dict of a workdir's config.json alike.
    """
    if model_config["finetune"] != "lora":
        return None
    return models.LoraConfig(
        rank=model_config["lora_rank"],
        alpha=model_config["lora_alpha"],
        dropout=model_config["lora_dropout"],
        targets=tuple(x.strip() for x in model_config["lora_targets"].split(",") if x.strip()),
    )


def build_model(config, num_labels: int):
    """The run's model and initial params: the checkpoint `model.name`, with its new head
    and LoRA factors drawn from `train.seed`. `model.pooling` holds the pooling after
    "auto" is resolved. Loading a trained run rebuilds its frozen params with this, so
    it must stay the one place a run's model is made."""
    m = config["model"]
    return models.from_pretrained(
        m["name"], num_labels, lora=lora_config(m), seed=config["train"]["seed"],
        pooling=m["pooling"], head_init=m["head_init"], dtype=config["train"].get("dtype", "float32"),
    )


@contextlib.contextmanager
def _naming(field: str, value: Any):
    """A missing folder or file, or an unreachable hub, as the one-line error of the setting that named it."""
    try:
        yield
    except OSError as e:
        raise ValueError(f"config.{field}={value!r}: {_one_line(e)}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def load_task(config: ml_collections.ConfigDict, tokenizer) -> data_lib.TaskData:
    """The config's task, tokenised; the user's csv / jsonl files by their paths alone."""
    d = config.data
    if d.task in data_lib.FILE_TASKS:
        files = data_lib.UserFiles(d.train_file, d.dev_file, d.text_column, d.text_pair_column, d.label_column)
        try:
            return data_lib.load_task(d.task, tokenizer, d.max_length, files=files)
        except FileNotFoundError as e:  # its message names data.train_file / data.dev_file
            raise ValueError(_one_line(e)) from None
    with _naming("data.dir", d.dir):
        return data_lib.load_task(d.task, tokenizer, d.max_length, data_dir=d.dir or None)


def load_task_and_model(config: ml_collections.ConfigDict, workdir: str):
    """The task, the run's delta, and the model with its parameters split (trainable, frozen)."""
    p, t = config.privacy, config.train
    with _naming("model.name", config.model.name):
        tokenizer = models.tokenizer(config.model.name)
    task = load_task(config, tokenizer)
    check_same_labels(workdir, task.spec.label_names)
    num_train = len(task.train["labels"])
    if t.expected_batch_size > num_train:
        raise ValueError(f"config.train.expected_batch_size={t.expected_batch_size!r} is invalid: must be at most "
                         f"the {num_train} training rows")
    delta = 0.0
    if p.method != "non_private":
        delta = p.delta or accounting.default_delta(num_train)
        accounting.check_delta(delta, num_train)
    with _naming("model.name", config.model.name):
        model, params = build_model(config, task.spec.num_labels)
    models.check_max_length(config.data.max_length, model.config)
    return task, delta, model, models.partition(params, config.model.finetune)
