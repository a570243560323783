"""The one set of argument checks of the library's entry points.

One policy for numbers, whoever asks:

- an integer argument is an integer type (`int`, a NumPy integer, or a 0-d
  integer array); `100.0` is refused, as are `2.5` and `True`;
- a real argument is an `int` or `float` (or a NumPy / 0-d array of one),
  never a bool, never NaN;
- a bad value raises `ValueError` (also for a wrong type, by the project's
  contract) whose message names the argument, its value and the accepted range.

This module imports nothing from the package, so every module may use it
(accounting, sampling, the mechanism); the config checks (`anadp._validate`)
name config fields instead and add the field's group to the message.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def _scalar(value: Any) -> Any:
    """A 0-d numeric array (NumPy, or JAX via `__array__`) as a Python scalar; anything else as is."""
    if not isinstance(value, (numbers.Number, str, bytes)) and hasattr(value, "__array__"):
        arr = np.asarray(value)
        if arr.shape == () and arr.dtype.kind in "biuf":
            return arr.item()
    return value


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def is_integer(value: Any) -> bool:
    """Whether `value` is an integer by this module's policy (an integer type, not a bool)."""
    value = _scalar(value)
    return not _is_bool(value) and isinstance(value, (numbers.Integral, np.integer))


def integer(name: str, value: Any, minimum: int) -> int:
    """`value` as an int, refused unless it is an integer type and `>= minimum`."""
    value = _scalar(value)
    if not is_integer(value) or int(value) < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def real(name: str, value: Any) -> float:
    """`value` as a float, refused unless it is a real number (not a bool, not NaN)."""
    value = _scalar(value)
    if _is_bool(value) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"{name}={value!r} must be a real number")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"{name}={value!r} must be a real number, not NaN")
    return out


def in_interval(name: str, value: Any, interval: str, *, note: str = "") -> float:
    """`value` as a float, refused unless it lies in `interval`.

    `interval` is written as in the message, e.g. "(0, 1]", "[0, inf)",
    "(0, inf)"; `inf` bounds exclude infinity unless the bracket is closed.
    The refusal reads "name=value is outside (0, 1]" plus `note`.
    """
    x = real(name, value)
    left, right = interval[0], interval[-1]
    low_text, high_text = (part.strip() for part in interval[1:-1].split(","))
    low, high = float(low_text), float(high_text)
    above = x >= low if left == "[" else x > low
    below = x <= high if right == "]" else x < high
    if not (above and below):
        raise ValueError(f"{name}={value!r} is outside {interval}{note}")
    return x


def at_least(name: str, value: Any, bound: float, *, strict: bool = False, note: str = "") -> float:
    """`value` as a float, refused unless `> bound` (strict) or `>= bound`: "name=value must be > bound"."""
    x = real(name, value)
    if not (x > bound if strict else x >= bound):
        raise ValueError(f"{name}={value!r} must be {'>' if strict else '>='} {bound:g}{note}")
    return x


def one_of(name: str, value: Any, choices: tuple) -> Any:
    """`value`, refused unless it is one of `choices`: "name='x' is not one of (...)"."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")
    return value


# --- the quantities that several modules check ------------------------------------


def sampling_rate(value: Any) -> float:
    """A Poisson sampling rate q in (0, 1]."""
    return in_interval("sampling_rate", value, "(0, 1]")


def noise_multiplier(value: Any, name: str = "noise_multiplier") -> float:
    """A noise multiplier in [0, inf) (0: no noise, no privacy)."""
    return in_interval(name, value, "[0, inf)", note=": it must be non-negative and finite")


def delta(value: Any) -> float:
    """A delta in (0, 1) (its bound against 1/N is `accounting.check_delta`'s)."""
    return in_interval("delta", value, "(0, 1)")
