"""What users watch: throughput, MFU and ETA, and the progress bar (tqdm on a terminal, one
plain line per log step anywhere else)."""

import io

import pytest

from qnext_jax.train.progress import (ProgressBar, Throughput, format_duration,
                                      peak_tflops_per_device)


def test_peak_flops_lookup():
    assert peak_tflops_per_device("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_per_device("TPU v5 lite") == 197.0
    assert peak_tflops_per_device("TPU v5p") == 459.0
    assert peak_tflops_per_device("cpu") is None


def test_throughput_mfu_and_eta_leave_out_the_compiling_step():
    meter = Throughput(tokens_per_step=1000, flops_per_token=1e9, devices=2, peak_tflops=10.0,
                       total_steps=100)
    first = meter.window(1, 30.0, steady=False)  # compile time
    assert first["tokens_per_sec"] == pytest.approx(1000 / 30)
    assert meter.eta_seconds(1) is None
    row = meter.window(9, 4.5, steady=True)  # 0.5 s per step
    assert row["tokens_per_sec"] == pytest.approx(2000.0)
    assert row["model_tflops"] == pytest.approx(2.0)
    assert row["mfu"] == pytest.approx(2.0 / 20.0)
    assert meter.eta_seconds(10) == pytest.approx(90 * 0.5)
    assert "mfu" not in Throughput(1000, 1e9, 1, None, 10).window(1, 1.0)


ROW = {"step": 50, "loss": 3.25, "ce_loss": 3.0, "mtp_loss": 3.5, "lbl_loss": 1.02,
       "tokens_per_sec": 1234.5, "model_tflops": 0.5, "mfu": 0.4321, "eval_loss": 3.1}


def test_progress_lines_without_a_terminal():
    stream = io.StringIO()  # a log file, CI, nohup: no carriage returns, a line per update
    bar = ProgressBar(total_steps=200, stream=stream)
    bar.update(ROW, eta=3725.0)
    bar.message("saved")
    bar.update({**ROW, "step": 60}, eta=None)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("step 50/200  loss 3.2500  ce 3.0000  mtp 3.5000")
    assert "1,234 tok/s" in lines[0] and "MFU 43.2%" in lines[0] and "ETA 1:02:05" in lines[0]
    assert "eval 3.1000" in lines[0] and lines[1] == "saved"
    assert lines[2].startswith("step 60/200") and "ETA --" in lines[2] and len(lines) == 3
    assert format_duration(59.6) == "1:00" and format_duration(3600) == "1:00:00"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_is_redrawn_in_place():
    stream = Terminal()
    bar = ProgressBar(total_steps=200, stream=stream, initial=40)  # a resumed run
    bar.update(ROW, eta=3725.0)
    bar.message("saved")
    bar.update({**ROW, "step": 60, "loss": 3.0}, eta=100.0)
    bar.close()
    frames = stream.getvalue().split("\r")
    assert len(frames) > 3  # tqdm redraws the one line
    assert any(f.startswith("50/200 |") and "MFU 43.2%" in f and "ETA 1:02:05" in f for f in frames)
    assert any(f.startswith("60/200 |") and "loss 3.0000" in f for f in frames)
    assert "saved\n" in stream.getvalue()  # messages get lines of their own
