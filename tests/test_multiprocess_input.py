"""Several processes whose devices share rows (a `sequence` or `tensor` axis spanning them):
each loads every row its devices hold, and two processes x 4 CPU devices train and evaluate
exactly like one process of 8 devices on the same mesh."""

import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import TESTS_DIR
from input_layouts import BATCH, LAYOUTS, run_layout
from test_train_step import free_port


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_processes_sharing_rows_equal_one_process(layout, tmp_path):
    port, out = free_port(), tmp_path / "result.json"
    procs = []
    for rank in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(rank))
        env.pop("XLA_FLAGS", None)
        procs.append(subprocess.Popen(
            [sys.executable, str(TESTS_DIR / "multiprocess_input_worker.py"), layout, str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    result = json.loads(out.read_text())
    assert result["process_rows"] == list(range(BATCH))  # every row, on both processes

    reference = run_layout(layout, jax.devices())
    for ours, ref in zip(result["train"], reference["train"]):
        assert ours == pytest.approx(ref, rel=1e-5)
    assert result["eval"]["eval_loss"] == pytest.approx(reference["eval"]["eval_loss"], rel=1e-5)
    assert result["eval"]["eval_mtp_loss"] == pytest.approx(reference["eval"]["eval_mtp_loss"],
                                                            rel=1e-5)
