"""The GPU device check's dry run (CPU, interpret mode, tiny shapes) passes, so the script that
spends a lent GPU's minutes never rots: every stage runs and reports."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_device_check_dry_run(repo_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a GPU
    completed = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "gpu" / "device_check.py"), "--dry-run",
         "--wait-peer-s", "0", "--workers", "2", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    by_stage = {}
    for row in results:
        by_stage.setdefault(row["stage"], []).append(row)
    assert [r["status"] for r in by_stage["correct"]] == ["PASS"] * 4  # bf16, fp32, 2 grouped
    assert {r["kernel"] for r in by_stage["kernels"]} == {
        "inverse", "prepare", "state_pass", "output", "local_dv", "state_pass_backward",
        "output_backward", "wy_backward"}
    assert len(by_stage["speed"]) == 6 and len(by_stage["experts"]) == 2
    # Blockwise only on CPU (the kernel and cuDNN need the GPU): a row and a shard, then timed.
    assert [r["status"] for r in by_stage["attention"]] == ["PASS"] * 2
    assert len(by_stage["attention speed"]) == 4
    assert by_stage["recipe"][0]["tokens_per_s"] > 0
