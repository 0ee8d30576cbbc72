"""The training loop in-process: a run of 2N steps equals N steps, stopped, then resumed for N
(every loss, final parameters, bit for bit on CPU); a poisoned batch stops the run naming its
step and leaves no checkpoint after it; a missing data path fails before compiling."""

import io
import json
import random
import xml.etree.ElementTree as ElementTree

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qnext_jax.train.loop as loop
from conftest import REPO_ROOT
from qnext_jax.data.sources import DataError
from qnext_jax.train.run_config import load_run_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "(", ")", ":", "\n"]
    for i in range(40):
        (directory / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(150)))
    return directory


def config_for(corpus, run_dir, steps, *extra):
    return load_run_config(None, [
        f"model.preset={REPO_ROOT / 'configs' / 'tiny.yaml'}", "model.num_hidden_layers=4",
        "model.vocab_size=320", "data.source=text", f"data.paths=[{corpus}/doc*.txt]",
        "data.eval_percent=10", f"train.steps={steps}", "optimizer.total_steps=6",
        "optimizer.warmup_steps=1", "train.batch_size=8", "train.seq_len=32", "train.log_every=1",
        "train.eval_every=3", "train.checkpoint_every=3", "mesh.fsdp=4", "mesh.expert=2",
        f"train.run_dir={run_dir}", *extra,
    ])


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_stopped_and_resumed_run_equals_uninterrupted(corpus, tmp_path):
    whole = tmp_path / "whole"
    progress = io.StringIO()
    _, whole_state = loop.train(config_for(corpus, whole, 6), whole, stream=progress)
    split = tmp_path / "split"
    loop.train(config_for(corpus, split, 3), split, stream=io.StringIO())
    _, resumed_state = loop.train(config_for(corpus, split, 6), split, stream=io.StringIO())

    assert losses(whole) == losses(split)  # bit for bit, every step
    assert len(losses(whole)) == 6 and losses(whole)[-1] < losses(whole)[0]
    for a, b in zip(jax.tree.leaves(whole_state), jax.tree.leaves(resumed_state)):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "ce_loss", "lbl_loss", "mtp_loss", "grad_norm", "lr",
            "tokens_per_sec", "eval_loss"} <= set(rows[2])
    assert np.asarray(rows[2]["expert_load"]).shape == (5, 8)  # 4 MoE layers + the MTP layer
    assert rows[2]["model_tflops"] > 0 and "mfu" not in rows[2]  # no peak FLOPs for a CPU
    shown = progress.getvalue()
    assert "6/6" in shown and "tok/s" in shown and "ETA" in shown and "GFLOP/s" in shown
    check_tensorboard_and_plots(whole, rows)


def check_tensorboard_and_plots(run_dir, rows):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for tag, key in (("train/loss", "loss"), ("train/mtp_loss", "mtp_loss"),
                     ("train/tokens_per_sec", "tokens_per_sec"), ("eval/ce_loss", "eval_loss")):
        logged = [(r["step"], r[key]) for r in rows if key in r]
        read = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in read] == [s for s, _ in logged]
        np.testing.assert_allclose([v for _, v in read], [v for _, v in logged], rtol=1e-6)

    svg = "{http://www.w3.org/2000/svg}"
    curves = ElementTree.parse(run_dir / "loss_curves.svg").getroot()
    labels = "".join(curves.itertext())
    assert "train (CE)" in labels and "MTP" in labels and "eval (CE)" in labels
    assert len(curves.findall(f"{svg}polyline")) == 3
    heatmap = ElementTree.parse(run_dir / "expert_load.svg").getroot()
    assert len(heatmap.findall(f"{svg}rect/{svg}title")) == 5 * 8  # (MoE layer, expert) cells


def test_poisoned_batch_stops_with_the_step_named(corpus, tmp_path, monkeypatch):
    calls = {"n": 0}
    place = loop.global_batch

    def poisoned(local, sharding, rows):
        calls["n"] += 1
        batch = place(local, sharding, rows)
        if calls["n"] == 5:  # the batch of step 5
            batch = batch._replace(loss_mask=batch.loss_mask * jnp.nan)
        return batch

    monkeypatch.setattr(loop, "global_batch", poisoned)
    run_dir = tmp_path / "poisoned"
    with pytest.raises(loop.TrainingError, match="non-finite loss at step 5"):
        loop.train(config_for(corpus, run_dir, 6, "train.log_every=3", "train.eval_every=100"),
                   run_dir, stream=io.StringIO())
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [3]


def test_missing_data_path_fails_before_compiling(tmp_path):
    config = config_for(tmp_path / "nowhere", tmp_path / "run", 2)
    with pytest.raises(DataError, match="text file .*nowhere/doc\\*.txt' matches no file"):
        loop.train(config, tmp_path / "run", stream=io.StringIO())
    assert not (tmp_path / "run" / "checkpoints").exists()
