"""anadp._checks: one policy for integer and real arguments, whoever asks."""

import numpy as np
import pytest

from anadp import _checks, accounting, sampling


def test_integers_are_integer_types_only():
    assert _checks.integer("steps", 100, 1) == 100
    assert _checks.integer("steps", np.int64(7), 1) == 7
    assert _checks.integer("steps", np.asarray(3), 1) == 3
    for bad in (100.0, 2.5, True, "3", None):
        with pytest.raises(ValueError, match=r"steps=.* must be an integer >= 1"):
            _checks.integer("steps", bad, 1)
    # The same rule at every entry point (accounting accepted 100.0 before, sampling did not).
    with pytest.raises(ValueError, match=r"steps=100\.0 must be an integer >= 1"):
        accounting.compute_epsilon(1.0, 0.1, 100.0, 1e-5, accountant="rdp")
    with pytest.raises(ValueError, match=r"num_examples=100\.0 must be an integer >= 1"):
        sampling.sampling_rate_for(10, 100.0)


def test_reals_and_intervals():
    assert _checks.real("x", 3) == 3.0 and _checks.real("x", np.float32(0.5)) == 0.5
    for bad in (True, "1", float("nan")):
        with pytest.raises(ValueError, match=r"x=.* must be a real number"):
            _checks.real("x", bad)
    assert _checks.in_interval("q", 1.0, "(0, 1]") == 1.0
    with pytest.raises(ValueError, match=r"q=0 is outside \(0, 1\]: why"):
        _checks.in_interval("q", 0, "(0, 1]", note=": why")
    with pytest.raises(ValueError, match=r"z=inf is outside \[0, inf\)"):
        _checks.in_interval("z", float("inf"), "[0, inf)")
    assert _checks.at_least("c", 0.0, 0) == 0.0
    with pytest.raises(ValueError, match=r"c=0\.0 must be > 0"):
        _checks.at_least("c", 0.0, 0, strict=True)
    with pytest.raises(ValueError, match=r"mode='x' is not one of \('a', 'b'\)"):
        _checks.one_of("mode", "x", ("a", "b"))
