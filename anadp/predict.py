"""Predict with a trained run: `python -m anadp.predict --workdir=W --input=F --output=P`.

F is a CSV or JSONL file (by extension) holding the column(s) the run was trained
on (`inference.text_columns`: the task's text fields, or `data.text_column` /
`data.text_pair_column` of a run on user data). P gets the same rows and columns,
in the same format, plus `prediction` (the label name) and `prob_<label>` for
each class. Texts are tokenised as in training (truncated to `data.max_length`).

Errors about the inputs (a missing file or column, an unknown format) are one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from anadp import inference
from anadp.data.user_files import jsonl_objects

FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
PREDICTION = "prediction"
PROB_PREFIX = "prob_"


def file_format(path: str) -> str:
    """"csv" or "jsonl", from the file's extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ValueError(f"{path!r}: unknown format {ext or '(no extension)'!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[ext]


def read_rows(path: str, fmt: str) -> tuple[list[dict], list[str]]:
    """The rows of a CSV / JSONL file, and its columns in order (for JSONL: the
    keys in order of first appearance)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input file {path!r} does not exist")
    if fmt == "csv":
        # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return rows, list(reader.fieldnames or [])
    rows, columns = [], {}
    with open(path, encoding="utf-8") as f:
        for _, row in jsonl_objects(f, lambda line, message: ValueError(f"{path!r} line {line}: {message}")):
            rows.append(row)
            columns.update(dict.fromkeys(row))
    return rows, list(columns)


def check_columns(rows: Sequence[dict], columns: Sequence[str], needed: Sequence[str], path: str) -> None:
    """Refuses input that lacks a text column (in its header, or in some JSONL row)."""
    for name in needed:
        if name not in columns:
            raise ValueError(f"{path!r} has no column {name!r} (the run was trained on {', '.join(needed)}); "
                             f"its columns: {', '.join(columns) or 'none'}")
    for number, row in enumerate(rows, start=1):
        for name in needed:
            if row.get(name) is None:
                raise ValueError(f"{path!r} row {number} has no value in column {name!r}")
    clashes = [c for c in columns if c == PREDICTION or c.startswith(PROB_PREFIX)]
    if clashes:
        raise ValueError(f"{path!r} already has the output column(s) {', '.join(clashes)}; rename them first")


def prediction_columns(labels: Sequence[str]) -> list[str]:
    return [PREDICTION] + [PROB_PREFIX + label for label in labels]


def with_predictions(rows: Sequence[dict], probs: np.ndarray, labels: Sequence[str]) -> list[dict]:
    """Each row plus its predicted label and class probabilities."""
    out = []
    for row, p in zip(rows, probs, strict=True):
        extra = {PREDICTION: labels[int(np.argmax(p))]}
        extra.update({PROB_PREFIX + label: float(x) for label, x in zip(labels, p, strict=True)})
        out.append({**row, **extra})
    return out


def write_rows(path: str, fmt: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Writes rows in `fmt` (to a temporary file first: an interrupted write leaves no partial output)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        if fmt == "csv":
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(columns))
                writer.writeheader()
                writer.writerows(rows)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def predict_file(workdir: str, input_path: str, output_path: str, batch_size: int = 64,
                 max_length: int | None = None) -> int:
    """Writes `output_path`; returns the number of rows predicted."""
    fmt = file_format(input_path)
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
        raise ValueError("--output must not be the --input file")
    out_ext = os.path.splitext(output_path)[1].lower()
    if FORMATS.get(out_ext, fmt) != fmt:
        raise ValueError(f"--output={output_path!r}: the output is written in the input's format ({fmt}); "
                         f"name it *.{fmt}")
    config = inference.read_run_config(workdir)
    needed = inference.text_columns(config)
    rows, columns = read_rows(input_path, fmt)
    check_columns(rows, columns, needed, input_path)

    model, params, tokenizer, labels = inference.load_run(workdir)
    texts = [row[needed[0]] for row in rows]
    pairs = [row[needed[1]] for row in rows] if len(needed) == 2 else None
    logits = inference.predict_logits(model, params, tokenizer, texts, pairs,
                                      max_length=max_length or int(config["data"]["max_length"]),
                                      batch_size=batch_size)
    probs = inference.softmax(logits)
    write_rows(output_path, fmt, with_predictions(rows, probs, labels), [*columns, *prediction_columns(labels)])
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anadp.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training run's workdir")
    parser.add_argument("--input", required=True, help="a .csv or .jsonl file with the text column(s)")
    parser.add_argument("--output", required=True, help="where to write the rows with predictions")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=None, help="default: the run's data.max_length")
    args = parser.parse_args(argv)

    def action() -> str:
        n = predict_file(args.workdir, args.input, args.output, args.batch_size, args.max_length)
        return f"wrote {n} rows with predictions to {args.output}"

    return inference.run_cli(action)


if __name__ == "__main__":
    sys.exit(main())
