"""Test session setup: 8 host CPU devices for mesh tests (must be set before jax is imported)."""

import os
import tempfile
from pathlib import Path

# The second flag sidesteps a reported wedge of XLA:CPU's multi-threaded Eigen pool (we saw
# forwards hang with every thread parked; the cause we found was OpenBLAS trsm, now unused).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The suite runs on the CPU. With the GPU plugin installed (the `aot` extra) jax would first
# try CUDA and log a failed cuInit on a machine without a GPU; the compile tests build their
# own compile-only GPU and TPU devices, which need no backend of their kind.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests build the same small programs many times (each trainer is a fresh jit); a per-session
# persistent compilation cache turns the repeats into cache hits. pytest-xdist's workers and
# the tests' subprocesses inherit the directory this process names, so all of them share it.
_CACHE = Path(tempfile.gettempdir()) / f"qnext_jax_test_jit_cache_{os.getpid()}"
_OWNS_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import sys  # noqa: E402

import pytest  # noqa: E402

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))
REPO_ROOT = TESTS_DIR.parent


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


def pytest_sessionfinish(session, exitstatus):
    """The process that named the cache removes it (an xdist worker's session ends while the
    other workers may still read it)."""
    import shutil

    if _OWNS_CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)
