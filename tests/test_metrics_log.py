"""Where metrics go: metrics.jsonl and TensorBoard (read back by TensorBoard's own reader,
across a resume that drops lost steps), W&B in offline mode (read back from its run file), a
failing sink that is switched off, and the plots drawn from the metrics."""

import json
import struct
import time

import numpy as np
import pytest

from qnext_jax.train.metrics_log import MetricsLog, read_metrics
from qnext_jax.train.plots import smoothed, write_run_plots


def row(step, loss):
    return {"step": step, "loss": loss, "ce_loss": loss - 0.5, "mtp_loss": loss + 0.25,
            "lbl_loss": 1.0, "z_loss": 0.0, "grad_norm": 1.0, "lr": 1e-3,
            "tokens_per_sec": 100.0 * step, "model_tflops": 0.01,
            "expert_load": [[0.25, 0.25, 0.4, 0.1]]}


def tensorboard_scalars(directory, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_resumed_run_replaces_the_lost_steps_in_jsonl_and_tensorboard(tmp_path):
    first = MetricsLog(tmp_path, resumed_at=0, run_config={})
    for step in range(1, 6):  # steps 4 and 5 are lost: the last checkpoint is step 3
        first.write(row(step, 10.0 - step))
    first.close()
    resumed = MetricsLog(tmp_path, resumed_at=3, run_config={})
    for step in (4, 5, 6):
        resumed.write({**row(step, 20.0 + step), "eval_loss": 1.5})
    resumed.close()

    assert [r["loss"] for r in read_metrics(tmp_path)] == [9.0, 8.0, 7.0, 24.0, 25.0, 26.0]
    assert tensorboard_scalars(tmp_path / "tensorboard", "train/loss") == [
        (1, 9.0), (2, 8.0), (3, 7.0), (4, 24.0), (5, 25.0), (6, 26.0)]
    assert tensorboard_scalars(tmp_path / "tensorboard", "eval/ce_loss") == [
        (4, 1.5), (5, 1.5), (6, 1.5)]


def test_a_failing_sink_is_switched_off_and_training_goes_on(tmp_path, capsys):
    log = MetricsLog(tmp_path, resumed_at=0, run_config={})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    log.events.add_scalar = full_disk
    for step in (1, 2):
        log.write(row(step, 3.0))
    log.close()
    err = capsys.readouterr().err
    assert err.count("writing metrics to TensorBoard failed (OSError") == 1  # reported once
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # the other sinks go on


def wandb_history(run_file):
    """The history rows of a W&B run file (LevelDB-log records of `Record` protobufs)."""
    from wandb.proto import wandb_internal_pb2

    data, position, block, pending, rows = run_file.read_bytes(), 7, 32768, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        payload = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 2):  # full record, first fragment
            pending = payload
        elif kind in (3, 4):  # middle, last fragment
            pending += payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path, resumed_at=0, run_config={"train": {"steps": 2}},
                     wandb_project="qnext-test", wandb_mode="offline")
    for step in (1, 2):
        log.write(row(step, 4.0 / step))
    log.close()
    run_id = (tmp_path / "wandb_run_id").read_text()
    [run_file] = (tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    # wandb's service process writes the file; under load its last block can land after
    # finish() returns (seen once in CI): wait for it rather than read a partial file.
    deadline = time.monotonic() + 60
    while len(history := wandb_history(run_file)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 4.0), (2, 2.0)]
    assert history[0]["train/tokens_per_sec"] == 100.0


def test_plots_are_drawn_from_the_metrics(tmp_path):
    log = MetricsLog(tmp_path, resumed_at=0, run_config={})
    for step in range(1, 41):
        log.write({**row(step, 5.0 + np.sin(step)), **({"eval_loss": 5.5} if step % 10 == 0 else {})})
    log.close()
    written = write_run_plots(tmp_path, ["layer 0"], log_steps=True)
    assert sorted(p.name for p in written) == ["expert_load.png", "expert_load.svg",
                                               "loss_curves.png", "loss_curves.svg"]
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    legend = (tmp_path / "loss_curves.svg").read_text()
    for label in ("train CE", "train MTP", "eval CE", "log scale"):
        assert label in legend, label
    assert "routed tokens / uniform share" in (tmp_path / "expert_load.svg").read_text()


def test_smoothing_is_a_debiased_moving_average():
    values = np.array([4.0, 2.0, 3.0])
    expected, numerator, denominator = [], 0.0, 0.0
    for value in values:  # the weighted mean of the values so far, weights 0.5^age
        numerator, denominator = 0.5 * numerator + value, 0.5 * denominator + 1
        expected.append(numerator / denominator)
    np.testing.assert_allclose(smoothed(values, 0.5), expected)
    np.testing.assert_allclose(smoothed(values, 0.0), values)
