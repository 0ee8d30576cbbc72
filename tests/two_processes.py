"""Runs a test worker script as two processes of one JAX job on localhost (each with the
4 CPU devices the worker asks for), as several hosts would run it."""

import os
import socket
import subprocess
import sys

from conftest import TESTS_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(worker: str, *args: str, timeout: int = 600) -> None:
    """tests/<worker> with `args` as processes 0 and 1; fails with both logs unless both
    exit 0."""
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(rank))
        env.pop("XLA_FLAGS", None)  # the worker sets its own device count
        procs.append(subprocess.Popen(
            [sys.executable, str(TESTS_DIR / worker), *args], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
