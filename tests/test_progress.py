"""What users see: FLOPs-per-token accounting against the model's real parameters, throughput,
MFU and ETA, the progress line, TensorBoard event files (read back by TensorBoard), plots."""

import io
import math
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT
from qnext_jax.config import ModelConfig
from qnext_jax.train.plots import expert_load_svg, loss_curves_svg, nice_ticks
from qnext_jax.train.progress import (ProgressBar, Throughput, format_duration,
                                      peak_tflops_per_device)
from qnext_jax.train.step import abstract_model
from qnext_jax.train.tensorboard import EventWriter, crc32c


def matmul_weights_per_token(config: ModelConfig) -> float:
    """Multiply-adds per token of every weight matrix, read off the model's own parameters:
    expert stacks count k of E, the LM head once per output (main + each MTP depth),
    embeddings and vectors (norms, biases, decay rates) count nothing."""
    _, params = abstract_model(config)
    total = 0.0
    for path, leaf in nnx.to_flat_state(params):
        names = [str(p) for p in path]
        shape = leaf.get_value().shape
        matrix_dims = len(shape) - (names[0] == "blocks")  # stacked blocks lead with an axis
        if names[0] == "embed" or names[-1].startswith("conv") or matrix_dims < 2:
            continue
        size = math.prod(shape)
        if names[-2:-1] == ["mlp"] and names[-1] in ("gate_proj", "up_proj", "down_proj"):
            size *= config.num_experts_per_tok / config.num_experts  # the routed expert stack
        if names[0] == "mtp":
            size *= config.mtp_depth
        if names[0] == "lm_head":
            size *= 1 + config.mtp_depth * bool(config.mtp_num_hidden_layers)
        total += size
    return total


@pytest.mark.parametrize("preset", ["small.yaml", "qwen3_next_80b_a3b.yaml"])
def test_training_flops_per_token_counts_the_models_weights(preset):
    config = ModelConfig.from_yaml(REPO_ROOT / "configs" / preset)
    seq_len, chunk = 512, 64
    attention_layers = sum(t == "full_attention" for t in config.mixer_types) + config.mtp_depth
    deltanet_layers = config.num_hidden_layers - sum(t == "full_attention" for t in config.mixer_types)
    attention = 4 * config.num_attention_heads * config.head_dim * (seq_len + 1) / 2
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    delta_rule = config.linear_num_value_heads * (2 * chunk * 2 * (dk + dv) + 6 * dk * dv)
    forward = (2 * matmul_weights_per_token(config) + attention_layers * attention
               + deltanet_layers * delta_rule)
    # The accounting also counts the small vectors (norm weights, conv taps): 0.16% (small).
    assert config.training_flops_per_token(seq_len, chunk) == pytest.approx(3 * forward, rel=2e-3)
    if preset == "qwen3_next_80b_a3b.yaml":  # ~3B active parameters: 6N is the bulk of it
        assert 6 * 3.0e9 < config.training_flops_per_token(4096) < 6 * 5.0e9


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


def test_progress_line_and_durations():
    stream = io.StringIO()
    bar = ProgressBar(total_steps=200, stream=stream, width=10)
    row = {"step": 50, "loss": 3.25, "ce_loss": 3.0, "mtp_loss": 3.5, "lbl_loss": 1.02,
           "tokens_per_sec": 1234.5, "model_tflops": 0.5, "mfu": 0.4321, "eval_loss": 3.1}
    bar.update(row, eta=3725.0)
    bar.message("saved")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("[##........] 50/200  loss 3.2500")
    assert "1,234 tok/s" in lines[0] and "MFU 43.2%" in lines[0] and "ETA 1:02:05" in lines[0]
    assert "eval 3.1000" in lines[0] and lines[1] == "saved"
    assert format_duration(59.6) == "1:00" and format_duration(3600) == "1:00:00"


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    assert crc32c(b"") == 0


def test_event_file_reads_back_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = EventWriter(tmp_path / "tb")
    values = {1: 9.75, 2: 7.5, 10: -0.125, 2**40: 1e-3}
    for step, value in values.items():
        writer.scalars(step, {"train/loss": value, "train/nan": float("nan")})
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/loss"]  # non-finite values are not written
    read = {e.step: e.value for e in events.Scalars("train/loss")}
    assert read.keys() == values.keys()
    np.testing.assert_allclose(list(read.values()), list(values.values()), rtol=1e-7)

    # A run resumed at step 2 (its checkpoint) after logging up to step 10: a new file whose
    # restart marker makes TensorBoard drop the old steps 2 and later.
    first = EventWriter(tmp_path / "tb2")
    for step in (1, 2, 3):
        first.scalars(step, {"train/loss": float(step)})
    first.close()
    resumed = EventWriter(tmp_path / "tb2")
    assert resumed.path != first.path
    resumed.restart(2)
    resumed.scalars(2, {"train/loss": 20.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb2"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 20.0)]


def test_plots_are_valid_svg_with_the_data():
    rows = [{"step": s, "ce_loss": 9 - s, "mtp_loss": 9.5 - s} for s in range(1, 6)]
    rows[-1]["eval_loss"] = 4.5
    root = ElementTree.fromstring(loss_curves_svg(rows))
    text = "".join(root.itertext())
    assert "train (CE) 4.000" in text and "MTP 4.500" in text and "eval (CE) 4.500" in text
    load = np.full((3, 4), 0.25)
    load[1] = [0.7, 0.1, 0.1, 0.1]
    heatmap = ElementTree.fromstring(expert_load_svg(load, ["layer 0", "layer 1", "mtp 1.0"], "load"))
    titles = [t.text for t in heatmap.iter("{http://www.w3.org/2000/svg}title")]
    assert len(titles) == 12 and "layer 1, expert 0: 2.80 x uniform" in titles
    assert nice_ticks(3.2, 9.1) == [4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
