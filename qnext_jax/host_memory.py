"""One host memory for every CPU train step: XLA:CPU's temporaries kept mapped between steps.

XLA:CPU gives a compiled computation all its temporaries as one buffer, malloc'd when the
computation starts and freed when it ends: 1.5 GB for the default replica's train step. glibc
serves an allocation that large with a fresh mmap and gives it back with munmap, so on every
step the kernel maps and zeroes 370,000 new 4 KiB pages: 0.6-0.9 s of system time in a 1.7 s
step on two cores, where PyTorch, whose tensors are smaller, faults a fifth as often.

Two settings make one mapping serve every step:

- JAX's CPU client runs a single-device computation inline, on the thread that calls it
  (`jax_cpu_enable_async_dispatch=False`), instead of on a worker thread. Its buffers then come
  from glibc's main arena; a worker thread's arena maps anything larger than its 64 MiB heaps
  afresh, whatever the settings.
- The main arena serves large blocks from its own heap (`M_MMAP_MAX=0`) and never gives the
  heap's free top back to the kernel (`M_TRIM_THRESHOLD=-1`), so the next step reuses the pages.

The price: the host no longer prepares the next batch while a step runs, and the process keeps
its peak heap. Both are small beside what it saves (docs/benchmarks.md, "fourth look"). Only
single-device computations run inline: a CPU mesh of several devices is unchanged. Off glibc,
with another default backend (a GPU, a TPU), or with QNEXT_JAX_KEEP_ALLOCATOR=1, the allocator
is left alone.
"""

from __future__ import annotations

import ctypes
import os

import jax

OPT_OUT = "QNEXT_JAX_KEEP_ALLOCATOR"
# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def _glibc():
    """The running C library if it is glibc (the only one whose mallopt we know), else None."""
    try:
        if os.confstr("CS_GNU_LIBC_VERSION").split()[0] != "glibc":
            return None
        return ctypes.CDLL(None)
    except (AttributeError, OSError, ValueError, IndexError):
        return None


def reuse_cpu_step_memory() -> bool:
    """Makes the CPU train steps of this process reuse one mapping for their temporaries.
    Call it in a program's entry point before anything creates JAX's backends (after
    `jax.distributed.initialize`, which does not); it creates them itself. Returns whether the
    allocator was changed: False off glibc, where the default backend is not the CPU, or with
    QNEXT_JAX_KEEP_ALLOCATOR=1."""
    from jax._src import xla_bridge

    if os.environ.get(OPT_OUT) == "1":
        return False
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "reuse_cpu_step_memory() must run before JAX creates its backends (before the first "
            "array, device query or compilation): the CPU client reads its dispatch mode then")
    libc = _glibc()
    if libc is None:
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if jax.default_backend() != "cpu":
        return False  # the CPU client is not where the steps run: nothing to reuse
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
