"""The user's own data: a CSV or JSONL train file (and optionally a dev file).

A row is one CSV record or one JSONL line. ``text_column`` holds the text,
``text_pair_column`` (when set) a second text (a sentence pair), and
``label_column`` the class. Labels may be strings or integers; the classes
and their order come from the train file alone:

- if every train label is an integer (a JSON integer, or a CSV cell of digits
  with an optional sign), classes are sorted numerically (``-1, 2, 10``) and
  named by their decimal form (``"-1", "2", "10"``; ``"07"`` is ``"7"``);
- otherwise they are sorted as strings (``"neg" < "neutral" < "pos"``;
  Python's order: by code point, so capitals before lower case).

Class id ``i`` is ``label_names[i]``. A dev label not among the train labels is
an error. Without a dev file the train file is split as the movie-review tasks
are (``readers.split_indices``: a seeded 90/10 split, seed ``SPLIT_SEED``).

Every error is a ``ValueError`` (``FileNotFoundError`` for a missing file)
naming the setting, the file, the line as a person counts it (1-based; the CSV
header is line 1; a CSV record spanning lines is named by its first) and the
column, e.g. ``data.train_file=/x.csv line 7: no column 'text' (columns: a, b)``.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from . import readers

FORMATS = ("csv", "jsonl")
# The text fields of a user task inside the library (the user's column names
# are only in UserFiles): one text, or a pair.
TEXT_FIELD, PAIR_FIELD = "text", "text_pair"
_INTEGER = re.compile(r"[+-]?\d+")


@dataclasses.dataclass(frozen=True)
class UserFiles:
    """Where a csv/jsonl task's rows are, and which columns hold what."""

    train_file: str
    dev_file: str = ""  # empty: a seeded split of the train file
    text_column: str = "text"
    text_pair_column: str = ""  # empty: single texts
    label_column: str = "label"

    @property
    def text_fields(self) -> tuple[str, ...]:
        return (TEXT_FIELD, PAIR_FIELD) if self.text_pair_column else (TEXT_FIELD,)

    def columns(self) -> dict[str, str]:
        """Library field -> the user's column."""
        cols = {TEXT_FIELD: self.text_column, "label": self.label_column}
        if self.text_pair_column:
            cols[PAIR_FIELD] = self.text_pair_column
        return cols


@dataclasses.dataclass(frozen=True)
class _Row:
    line: int
    values: dict  # column -> raw value (str for CSV; any JSON value for JSONL)
    columns: tuple[str, ...]  # what the row has, for messages


class _Where:
    """The prefix of every message about one file: ``data.train_file=PATH``."""

    def __init__(self, setting: str, path: str):
        self.setting, self.path = setting, path

    def __str__(self) -> str:
        return f"data.{self.setting}={self.path}"

    def error(self, line: int | None, message: str) -> ValueError:
        at = f" line {line}" if line is not None else ""
        return ValueError(f"{self}{at}: {message}")


# --- reading rows ---------------------------------------------------------------


def _open(where: _Where):
    path = Path(where.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of the first column's name.
    return open(path, encoding="utf-8-sig", newline="")


def _csv_rows(where: _Where, required: tuple[str, ...]) -> Iterator[_Row]:
    with _open(where) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise where.error(None, "the file is empty (expected a header line naming the columns)")
        header = [h.strip() for h in header]
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise where.error(1, f"column(s) {', '.join(map(repr, repeated))} appear more than once in the header")
        for column in required:  # named at the header, where the columns are
            if column not in header:
                raise where.error(1, f"no column {column!r} (columns: {', '.join(header)})")
        # A record may span several physical lines (a quoted newline): it is named
        # by its first line, one past where the previous record ended.
        first_line = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # e.g. a NUL byte, or a field over csv.field_size_limit()
                raise where.error(first_line, f"not valid CSV ({e})") from None
            line, first_line = first_line, reader.line_num + 1
            if not cells:  # a blank line
                continue
            if len(cells) != len(header):
                raise where.error(line, f"{len(cells)} fields, the header has {len(header)} ({', '.join(header)})")
            yield _Row(line, dict(zip(header, cells)), tuple(header))


def jsonl_objects(lines: Iterable[str], error: Callable[[int, str], Exception]) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file, which must be a
    JSON object; `error(line, message)` is the exception a bad line raises."""
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise error(line, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise error(line, f"expected a JSON object, got {type(obj).__name__}")
        yield line, obj


def _jsonl_rows(where: _Where) -> Iterator[_Row]:
    with _open(where) as f:
        for line, obj in jsonl_objects(f, where.error):
            yield _Row(line, obj, tuple(obj))


def _rows(fmt: str, where: _Where, required: tuple[str, ...]) -> Iterator[_Row]:
    rows = _csv_rows(where, required) if fmt == "csv" else _jsonl_rows(where)
    try:
        yield from rows
    except UnicodeDecodeError as e:
        raise where.error(None, f"not UTF-8 text ({e.reason} at byte {e.start})") from None


# --- one value ------------------------------------------------------------------------


def _value(where: _Where, row: _Row, column: str):
    if column not in row.values:
        raise where.error(row.line, f"no column {column!r} (columns: {', '.join(row.columns)})")
    return row.values[column]


def _text(where: _Where, row: _Row, column: str) -> str:
    value = _value(where, row, column)
    if value is None or isinstance(value, str) and not value.strip():
        raise where.error(row.line, f"column {column!r} is empty")
    if not isinstance(value, str):
        raise where.error(row.line, f"column {column!r} holds {json.dumps(value)}, not a text")
    return value


def _label_name(where: _Where, row: _Row, column: str) -> str:
    """The label as written: a JSON integer in decimal, or the stripped string."""
    value = _value(where, row, column)
    if value is None or isinstance(value, str) and not value.strip():
        raise where.error(row.line, f"column {column!r} is empty (a missing label)")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise where.error(row.line, f"column {column!r} holds {json.dumps(value)}: a label is a string or an integer")
    return str(value).strip()


def _read(fmt: str, setting: str, path: str, files: UserFiles) -> tuple[dict[str, list], list[int]]:
    """``({field: [text, ...], "label": [name, ...]}, [line, ...])`` of one file."""
    where = _Where(setting, path)
    cols = files.columns()
    out: dict[str, list] = {field: [] for field in cols}
    lines = []
    for row in _rows(fmt, where, tuple(cols.values())):
        for field, column in cols.items():
            reader = _label_name if field == "label" else _text
            out[field].append(reader(where, row, column))
        lines.append(row.line)
    if not lines:
        raise where.error(None, "no rows")
    return out, lines


# --- labels ---------------------------------------------------------------------------


def label_names(names: list[str]) -> tuple[str, ...]:
    """The classes in id order: numeric order if every name is an integer, else string order."""
    if all(_INTEGER.fullmatch(n) for n in names):
        return tuple(str(v) for v in sorted({int(n) for n in names}))
    return tuple(sorted(set(names)))


def _canonical(name: str, numeric: bool) -> str:
    return str(int(name)) if numeric and _INTEGER.fullmatch(name) else name


def _label_ids(where: _Where, names: list[str], lines: list[int], classes: tuple[str, ...], column: str) -> np.ndarray:
    numeric = all(_INTEGER.fullmatch(c) for c in classes)
    index = {c: i for i, c in enumerate(classes)}
    ids = np.empty(len(names), np.int64)
    for k, (name, line) in enumerate(zip(names, lines)):
        i = index.get(_canonical(name, numeric))
        if i is None:
            raise where.error(line, f"label {name!r} in column {column!r} is not a label of the train file "
                                    f"({', '.join(classes)})")
        ids[k] = i
    return ids


# --- the task -------------------------------------------------------------------------


def read_user_task(fmt: str, files: UserFiles) -> tuple[dict[str, dict], tuple[str, ...]]:
    """``({"train": cols, "validation": cols}, label_names)``; ``cols`` maps
    ``files.text_fields`` to texts and ``"label"`` to int64 class ids."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    train, train_lines = _read(fmt, "train_file", files.train_file, files)
    classes = label_names(train["label"])
    if len(classes) < 2:
        raise _Where("train_file", files.train_file).error(
            None, f"column {files.label_column!r} has a single label ({classes[0]}); a classifier needs at least 2")
    train["label"] = _label_ids(_Where("train_file", files.train_file), train["label"], train_lines, classes,
                                files.label_column)
    if files.dev_file:
        dev, dev_lines = _read(fmt, "dev_file", files.dev_file, files)
        dev["label"] = _label_ids(_Where("dev_file", files.dev_file), dev["label"], dev_lines, classes,
                                  files.label_column)
        return {"train": train, "validation": dev}, classes
    return _split(train, files), classes


def _split(rows: dict[str, list], files: UserFiles) -> dict[str, dict]:
    n = len(rows["label"])
    train_idx, dev_idx = readers.split_indices(n)
    if len(dev_idx) == 0 or len(train_idx) == 0:
        raise _Where("train_file", files.train_file).error(
            None, f"{n} rows, too few to hold out {readers.DEV_FRACTION:.0%} as a dev split; "
                  "set data.dev_file (or add rows)")
    labels = np.asarray(rows["label"], np.int64)
    return {
        split: {**{f: [rows[f][i] for i in idx] for f in files.text_fields}, "label": labels[idx]}
        for split, idx in (("train", train_idx), ("validation", dev_idx))
    }


def fingerprint(fmt: str, files: UserFiles) -> dict:
    """What decides the tokenised arrays: the files' contents (an edited file
    is tokenised again), the columns and the split."""

    def content_hash(path: str) -> str:
        h = hashlib.sha256()
        with open(Path(path).expanduser(), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    stamp = {"format": fmt, "columns": files.columns(), "train_sha256": content_hash(files.train_file)}
    if files.dev_file:
        stamp["dev_sha256"] = content_hash(files.dev_file)
    else:
        stamp["split"] = {"seed": readers.SPLIT_SEED, "dev_fraction": readers.DEV_FRACTION}
    return stamp
