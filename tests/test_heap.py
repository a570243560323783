"""anadp.heap: the malloc settings entry points re-execute with."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from anadp import heap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")


def test_a_value_the_user_set_is_kept():
    env = heap.environment_with_settings({"MALLOC_ARENA_MAX": "4", "PATH": "/bin"})
    assert env["MALLOC_ARENA_MAX"] == "4"
    assert env["PATH"] == "/bin"
    assert env["MALLOC_TRIM_THRESHOLD_"] == heap.SETTINGS["MALLOC_TRIM_THRESHOLD_"]


@glibc_only
def test_applies_until_every_setting_is_in_effect_or_it_is_switched_off():
    assert heap.applies({})
    assert heap.applies({"MALLOC_ARENA_MAX": "1"})
    assert not heap.applies(dict(heap.SETTINGS))
    assert not heap.applies({heap.SWITCH: "0"})


def _run_child(env_extra: dict) -> list[str]:
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        print("start", flush=True)
        from anadp import heap
        heap.reexec_with_heap_settings()
        print("args", sys.argv[1:])
        print("env", [os.environ.get(k) for k in sorted(heap.SETTINGS)])
    """)
    env = {k: v for k, v in os.environ.items() if k not in heap.SETTINGS and k != heap.SWITCH}
    out = subprocess.run([sys.executable, "-c", script, "--flag=1", "x y"], env={**env, **env_extra},
                         capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.splitlines()


@glibc_only
def test_reexec_runs_the_same_command_once_with_the_settings():
    lines = _run_child({})
    # "start" twice: the original process, then its replacement; "args" once.
    assert lines.count("start") == 2
    assert lines[-2] == "args ['--flag=1', 'x y']"
    assert lines[-1] == "env " + str([heap.SETTINGS[k] for k in sorted(heap.SETTINGS)])


@glibc_only
def test_switched_off_it_does_not_reexec():
    lines = _run_child({heap.SWITCH: "0"})
    assert lines.count("start") == 1
    assert lines[-1] == "env [None, None, None, None]"
