"""Any GLUE classification task: `--config=configs/glue.py:mnli`."""

from configs import base

PAIR_TASKS = ("mnli", "qnli", "qqp", "rte", "mrpc")


def get_config(task: str = "sst2"):
    config = base.get_config()
    config.data.task = task
    config.data.max_length = 128 if task in PAIR_TASKS else 64
    return config
