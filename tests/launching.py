"""launch.py on a tiny random BERT (rotten_tomatoes), as the end-to-end tests run it."""

import os
import subprocess
import sys

from configs.tiny import FLAGS as TINY_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = list(TINY_FLAGS)


def launch_env(extra=None) -> dict:
    """The environment of a test's subprocess: CPU only, quiet, plus `extra`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.update(extra or {})
    return env


def launch(workdir, *flags, env_extra=None, wait=True):
    """launch.py with the TINY flags, then `flags`: the finished process (text output,
    15 minutes at most), or with wait=False the running one (stdout and stderr as one)."""
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), f"--workdir={workdir}", *TINY, *flags]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=launch_env(env_extra), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    return subprocess.run(cmd, cwd=ROOT, env=launch_env(env_extra), capture_output=True, text=True, timeout=900)
