"""Transparent huge pages for the host's large buffers (Linux with glibc 2.35 or newer).

XLA:CPU allocates every execution's temporaries with malloc and frees them when it returns. A
buffer that large is its own mmap, so each train step maps fresh memory and the kernel faults it
in 4 KiB at a time: for the default replica's step (1.5 GB of temporaries) that is 370,000
faults and 0.6 s of system time per step, a fifth of the step on two cores. glibc's tunable
`glibc.malloc.hugetlb=1` makes malloc advise the kernel to back those mappings with transparent
huge pages (2 MiB), 512 times fewer faults. No allocator setting can be changed once the process
runs (glibc reads its tunables at start-up, and `mallopt` cannot keep a mapping that large), so an
entry point re-executes itself with the tunable set, once, before it imports JAX.

Nothing happens where it cannot help: off Linux/glibc, on a glibc without the tunable, where the
kernel's transparent huge pages are `never` (none to get) or `always` (already used), where the
environment already names the tunable, or with QNEXT_JAX_KEEP_ALLOCATOR=1 (the opt-out).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "QNEXT_JAX_KEEP_ALLOCATOR"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library this process runs on, None if it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def kernel_huge_page_mode() -> str | None:
    """The bracketed choice of /sys/kernel/mm/transparent_hugepage/enabled ("madvise", ...)."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def reexec_needed(environ=os.environ) -> bool:
    """Whether this process would gain from restarting with the tunable set."""
    if not sys.platform.startswith("linux") or environ.get(OPT_OUT) == "1":
        return False
    if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False  # set already: by us before the re-exec, or by the user
    version = glibc_version()
    return version is not None and version >= (2, 35) and kernel_huge_page_mode() == "madvise"


def use_huge_pages_for_host_buffers() -> None:
    """Re-executes this program (same pid, arguments and environment) with the tunable added to
    GLIBC_TUNABLES, if that helps; returns at once otherwise. Call it first thing in a script's
    `__main__`, before JAX is imported (a process that imported it would pay the import twice)."""
    argv = getattr(sys, "orig_argv", None)
    if not reexec_needed() or not argv or sys.argv[0] in ("", "-", "-c"):
        return  # a program read from stdin or given with -c could not be read again
    environ = dict(os.environ)
    environ["GLIBC_TUNABLES"] = ":".join(
        part for part in (environ.get("GLIBC_TUNABLES"), f"{TUNABLE}=1") if part)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, environ)
