"""Several processes whose devices share rows (a `sequence` or `tensor` axis spanning them):
each loads every row its devices hold, and two processes x 4 CPU devices train and evaluate
exactly like one process of 8 devices on the same mesh."""

import json

import jax
import pytest

from input_layouts import BATCH, LAYOUTS, run_layout
from two_processes import run_two_processes


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_processes_sharing_rows_equal_one_process(layout, tmp_path):
    out = tmp_path / "result.json"
    run_two_processes("multiprocess_input_worker.py", layout, str(out))
    result = json.loads(out.read_text())
    assert result["process_rows"] == list(range(BATCH))  # every row (each process asserts it)

    reference = run_layout(layout, jax.devices())
    for ours, ref in zip(result["train"], reference["train"]):
        assert ours == pytest.approx(ref, rel=1e-5)
    assert result["eval"]["eval_loss"] == pytest.approx(reference["eval"]["eval_loss"], rel=1e-5)
    assert result["eval"]["eval_mtp_loss"] == pytest.approx(reference["eval"]["eval_mtp_loss"],
                                                            rel=1e-5)
