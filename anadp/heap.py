"""Process-wide glibc malloc settings for training on the CPU, applied by re-executing.

XLA's CPU runtime allocates every buffer of a step (activations, their
gradients, temporaries: hundreds of MB per pass) with malloc and frees it when
the step ends. With glibc's defaults each large buffer is a fresh `mmap` that
is unmapped on free, and the heaps of the thread-pool arenas are trimmed back
to the kernel: every step faults every page of every buffer in again and the
kernel zeroes it. With the settings a full fine-tuning step is about 10%
faster and faults 7 times less; the default LoRA run takes as long (README,
Speed, for the measurements). One arena and no trimming keep freed memory in
one heap that the next step reuses; the price is that the resident size stays
at its peak plus the 1 GB pad.

These are environment variables glibc reads when the process starts (set from
inside a running interpreter with `mallopt`, they removed only half of the
faults), so `reexec_with_heap_settings` starts the program again with them.
Entry points (launch.py, experiments/benchmark.py, profile_step.py) call it
first thing; the library never does on import. This module imports nothing
from the package, so launch.py loads it by path before jax is imported. Set
`ANADP_HEAP_SETTINGS=0` to keep the process's own malloc behaviour; a variable
the user already set is kept.
"""

from __future__ import annotations

import os
import platform
import sys

SETTINGS = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main heap
    "MALLOC_MMAP_THRESHOLD_": str(4 << 30),  # large buffers from the heap, not mmap
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),  # never hand the heap's top back
    "MALLOC_TOP_PAD_": str(1 << 30),  # grow the heap in 1 GB steps
}
SWITCH = "ANADP_HEAP_SETTINGS"


def applies(environ=os.environ) -> bool:
    """Whether the settings are wanted and not yet in effect (glibc only)."""
    if environ.get(SWITCH, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    return any(name not in environ for name in SETTINGS)


def environment_with_settings(environ=os.environ) -> dict[str, str]:
    """`environ` plus `SETTINGS` (a value already there wins)."""
    return {**SETTINGS, **environ}


def reexec_with_heap_settings() -> None:
    """Replaces this process by the same command (interpreter options included)
    with `SETTINGS` in its environment, unless they are in effect or switched
    off. Call it before the program has done anything a restart would repeat."""
    if not applies():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment_with_settings())
