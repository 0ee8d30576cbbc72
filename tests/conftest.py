"""Test session setup: 8 host CPU devices for mesh tests (must be set before jax is imported)."""

import os

# The second flag sidesteps a reported wedge of XLA:CPU's multi-threaded Eigen pool (we saw
# forwards hang with every thread parked; the cause we found was OpenBLAS trsm, now unused).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_cpu_multi_thread_eigen=false"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TESTS_DIR = Path(__file__).parent
sys.path.insert(0, str(TESTS_DIR))
REPO_ROOT = TESTS_DIR.parent


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
