"""Task registry: fields, labels, evaluation splits and metrics of each task."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from . import metrics as _metrics


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A classification task.

    ``text_fields``: one field (single sentence) or two (a sentence pair, fed
    to the tokenizer as ``tokenizer(first, second)``). ``eval_splits``: the
    splits reported (MNLI: matched and mismatched). ``compute_metrics`` scores
    one split; ``evaluate`` scores several into ``"<split>/<metric>"`` keys;
    ``main_key`` (``"<main_split>/<main_metric>"``) is the headline number.
    """

    name: str
    num_labels: int
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    main_metric: str
    eval_splits: tuple[str, ...] = ("validation",)
    source: str = "glue"  # "glue", "movie_reviews" or "file" (the user's CSV / JSONL)
    description: str = ""

    @property
    def main_split(self) -> str:
        return self.eval_splits[0]

    @property
    def main_key(self) -> str:
        return f"{self.main_split}/{self.main_metric}"

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    def compute_metrics(self, predictions, labels) -> dict[str, float]:
        """Metrics of one split; ``predictions``: class ids [n] or logits [n, C]."""
        return _metrics.compute(self.metric_names, predictions, labels)

    def evaluate(self, results: Mapping[str, tuple]) -> dict[str, float]:
        """``{split: (predictions, labels)}`` -> ``{"<split>/<metric>": value}``."""
        out = {}
        for split, (predictions, labels) in results.items():
            for k, v in self.compute_metrics(predictions, labels).items():
                out[f"{split}/{k}"] = v
        return out


_ENTAIL2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("sst2", 2, ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy",
                 description="GLUE SST-2: Stanford Sentiment Treebank, binary sentiment"),
        TaskSpec("cola", 2, ("sentence",), ("unacceptable", "acceptable"),
                 ("matthews_correlation",), "matthews_correlation",
                 description="GLUE CoLA: grammatical acceptability"),
        TaskSpec("mrpc", 2, ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
                 ("accuracy", "f1", "combined_score"), "accuracy",
                 description="GLUE MRPC: paraphrase (F1 and accuracy)"),
        TaskSpec("qqp", 2, ("question1", "question2"), ("not_duplicate", "duplicate"),
                 ("accuracy", "f1", "combined_score"), "accuracy",
                 description="GLUE QQP: duplicate questions (F1 and accuracy)"),
        TaskSpec("mnli", 3, ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                 ("accuracy",), "accuracy",
                 eval_splits=("validation_matched", "validation_mismatched"),
                 description="GLUE MNLI: matched and mismatched accuracy"),
        TaskSpec("qnli", 2, ("question", "sentence"), _ENTAIL2, ("accuracy",), "accuracy",
                 description="GLUE QNLI: question-answer entailment"),
        TaskSpec("rte", 2, ("sentence1", "sentence2"), _ENTAIL2, ("accuracy",), "accuracy",
                 description="GLUE RTE: textual entailment"),
        TaskSpec("rotten_tomatoes", 2, ("text",), ("negative", "positive"), ("accuracy",),
                 "accuracy", source="movie_reviews",
                 description="Rotten Tomatoes sentence polarity (movie-reviews package), "
                             "seeded 90/10 train/validation split"),
        TaskSpec("imdb", 2, ("text",), ("negative", "positive"), ("accuracy",), "accuracy",
                 source="movie_reviews",
                 description="IMDB train reviews (movie-reviews package), seeded 90/10 "
                             "train/validation split"),
        # The user's own data. Classes, their names and the text fields come from
        # the files: load_task returns the spec with them (user_task_spec).
        TaskSpec("csv", 0, ("text",), (), ("accuracy", "macro_f1"), "accuracy", source="file",
                 description="your CSV file(s): data.train_file, data.dev_file and the column fields"),
        TaskSpec("jsonl", 0, ("text",), (), ("accuracy", "macro_f1"), "accuracy", source="file",
                 description="your JSON-lines file(s): data.train_file, data.dev_file and the column fields"),
    ]
}

FILE_TASKS = tuple(name for name, t in TASKS.items() if t.source == "file")


def user_task_spec(template: TaskSpec, label_names: tuple[str, ...], text_fields: tuple[str, ...]) -> TaskSpec:
    """A file task's spec once its files are read: the train file's classes."""
    return dataclasses.replace(template, num_labels=len(label_names), label_names=tuple(label_names),
                               text_fields=tuple(text_fields))

class UnknownTaskError(KeyError, ValueError):
    """An unknown task name (a KeyError and a ValueError, with a plain message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


GLUE_TASKS = tuple(name for name, t in TASKS.items() if t.source == "glue")


def known_tasks() -> tuple[str, ...]:
    return tuple(TASKS)


def get_task(name: str) -> TaskSpec:
    key = str(name).lower().replace("-", "")
    aliases = {"sst": "sst2", "rottentomatoes": "rotten_tomatoes"}
    key = aliases.get(key, key)
    if key in TASKS:
        return TASKS[key]
    raise UnknownTaskError(
        f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}"
    )
