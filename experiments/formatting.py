"""How numbers, methods and Markdown tables are written in the experiments' outputs (shared by the collector,
its figures, analysis.py and the audits)."""

from __future__ import annotations

import math

# Non-private first, then the baseline, then the method under study: in tables and legends.
METHOD_ORDER = {"non_private": 0, "dp_sgd": 1, "anadp": 2}


def method_rank(method: str) -> int:
    """A method's place in METHOD_ORDER (unknown methods last)."""
    return METHOD_ORDER.get(method, 9)


def short_number(x: float) -> str:
    """The shortest faithful text of a setting's number, as in cell names: 3.0 -> "3", 0.002 -> "0.002"."""
    return f"{x:g}"


def plus_minus(mean: float | None, sd: float | None, scale: float = 100.0, digits: int = 2) -> str:
    """`mean ± sd` scaled (×100 by default), "–" without a finite mean, the mean alone without a finite sd."""
    if mean is None or not math.isfinite(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    if sd is not None and math.isfinite(sd):
        text += f" ± {sd * scale:.{digits}f}"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table: header, separator, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
