"""The training loop in-process: a run of 2N steps equals N steps, stopped, then resumed for N
(every loss, final parameters, bit for bit on CPU); a poisoned batch stops the run naming its
step and leaves no checkpoint after it; evaluation that is off, impossible or failing; a resume
that would change the trajectory; preemption on the final step still exports; bad input fails
before compiling."""

import io
import json
import os
import random
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qnext_jax.train.loop as loop
from conftest import REPO_ROOT
from qnext_jax.config import ConfigError
from qnext_jax.data.sources import DataError
from qnext_jax.train.evaluation import Evaluator
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
    assert "dtypes: parameters float32, compute float32" in shown
    check_tensorboard_and_plots(whole, rows)
    check_tensorboard_and_plots(split, [json.loads(line) for line in
                                        (split / "metrics.jsonl").read_text().splitlines()])

    # Extending the finished run: a changed trajectory is refused before any compilation,
    # naming each key; accepted, the run goes on.
    with pytest.raises(ConfigError) as refused:
        loop.train(config_for(corpus, split, 7, "optimizer.learning_rate=0.5",
                              "optimizer.total_steps=8"), split, stream=io.StringIO())
    message = str(refused.value)
    assert "optimizer.learning_rate: 0.0003 -> 0.5" in message
    assert "optimizer.total_steps: 6 -> 8" in message and "train.steps" not in message
    assert "train.accept_changes=[optimizer.learning_rate,optimizer.total_steps]" in message
    shown = io.StringIO()  # (a data change keeps the compiled programs: no new compilation)
    last, _ = loop.train(config_for(corpus, split, 7, "data.seed=5",
                                    "train.accept_changes=[data.seed]"), split, stream=shown)
    assert last["step"] == 7 and "changed data.seed: 0 -> 5 (accepted)" in shown.getvalue()


def check_tensorboard_and_plots(run_dir, rows):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    for tag, key in (("train/loss", "loss"), ("train/mtp_loss", "mtp_loss"),
                     ("train/tokens_per_sec", "tokens_per_sec"), ("eval/ce_loss", "eval_loss"),
                     ("eval/mtp_loss", "eval_mtp_loss")):
        logged = [(r["step"], r[key]) for r in rows if key in r]
        read = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in read] == [s for s, _ in logged]
        np.testing.assert_allclose([v for _, v in read], [v for _, v in logged], rtol=1e-6)
    accepted = [(r["step"], r["eval_mtp_acceptance"][0]) for r in rows if "eval_loss" in r]
    read = [(e.step, e.value) for e in events.Scalars("eval/mtp_acceptance_depth1")]
    assert [s for s, _ in read] == [s for s, _ in accepted]
    assert all(0.0 <= v <= 1.0 for _, v in accepted)
    np.testing.assert_allclose([v for _, v in read], [v for _, v in accepted], rtol=1e-6)
    for name in ("loss_curves.png", "loss_curves.svg", "expert_load.png", "expert_load.svg",
                 "mtp_acceptance.png", "mtp_acceptance.svg"):
        assert (run_dir / name).stat().st_size > 1000, name
    for layer in ("layer 3", "mtp 1.0"):  # the heatmap names every MoE layer
        assert layer in (run_dir / "expert_load.svg").read_text()


def checkpoint_steps(run_dir):
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_sequence_split_run_has_the_losses_of_an_unsplit_run(corpus, tmp_path):
    """The same run with every row over 4 sequence shards (fsdp=2 x sequence=4) and without
    (fsdp=4 x expert=2): the logged losses agree to fp32 rounding, step by step."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    loop.train(config_for(corpus, whole, 2, "train.eval_every=0"), whole, stream=io.StringIO())
    loop.train(config_for(corpus, split, 2, "train.eval_every=0", "mesh.fsdp=2", "mesh.expert=1",
                          "mesh.sequence=4"), split, stream=io.StringIO())
    assert len(losses(whole)) == 2
    np.testing.assert_allclose(losses(split), losses(whole), rtol=1e-5)


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
    assert checkpoint_steps(run_dir) == [3]


def test_a_run_whose_first_step_fails_leaves_nothing_behind(corpus, tmp_path, monkeypatch):
    """Nothing was trained: the folder it made goes; a folder that was there (empty) stays,
    emptied; a run that trained a step keeps everything (here: the NaN's step named, its
    metrics to read)."""
    make = loop.trainer_for_run

    def failing_first_step(*args, **kwargs):
        def step(state, batch):
            raise RuntimeError("the first step failed")
        return make(*args, **kwargs)._replace(step=step)

    monkeypatch.setattr(loop, "trainer_for_run", failing_first_step)
    made = tmp_path / "made"
    there = tmp_path / "there"
    there.mkdir()
    for run_dir in (made, there):
        with pytest.raises(RuntimeError, match="the first step failed"):
            loop.train(config_for(corpus, run_dir, 2), run_dir, stream=io.StringIO())
    assert not made.exists() and there.is_dir() and not any(there.iterdir())

    monkeypatch.setattr(loop, "trainer_for_run", make)
    place = loop.global_batch
    poisoned = lambda *args: place(*args)._replace(loss_mask=jnp.full((8, 32), jnp.nan))  # noqa
    monkeypatch.setattr(loop, "global_batch", poisoned)
    nan = tmp_path / "nan"
    with pytest.raises(loop.TrainingError, match="non-finite loss at step 1"):
        loop.train(config_for(corpus, nan, 2), nan, stream=io.StringIO())
    assert (nan / "config.json").is_file() and checkpoint_steps(nan) == []


def refuse_to_compile(*args, **kwargs):
    raise AssertionError("compiled a trainer for a run that cannot work")


def test_evaluation_off_or_impossible(corpus, tmp_path, monkeypatch):
    # No held-out data: evaluation must be off, and then the run trains.
    with pytest.raises(ConfigError, match="data.eval_percent=0 holds out no documents.*eval_every=0"):
        loop.train(config_for(corpus, tmp_path / "a", 2, "data.eval_percent=0"), tmp_path / "a")
    last, _ = loop.train(config_for(corpus, tmp_path / "b", 3, "data.eval_percent=0",
                                    "train.eval_every=0"), tmp_path / "b", stream=io.StringIO())
    assert last["step"] == 3 and "eval_loss" not in last
    # An eval split smaller than one batch fails before anything is compiled.
    monkeypatch.setattr(loop, "trainer_for_run", refuse_to_compile)
    with pytest.raises(DataError, match=r"the eval split has \d+ rows of 33 tokens, fewer than one "
                                        r"batch \(train.batch_size=64\)"):
        loop.train(config_for(corpus, tmp_path / "c", 2, "train.batch_size=64"), tmp_path / "c",
                   stream=io.StringIO())


@pytest.mark.parametrize("fail_at, checkpoint_every", [(3, 3), (2, 3)])
def test_a_failing_evaluation_keeps_the_checkpoint_of_its_step(corpus, tmp_path, monkeypatch,
                                                               fail_at, checkpoint_every):
    """eval_every == checkpoint_every: the save comes first; an eval step that is no save step
    saves before the error goes up."""
    evaluate = Evaluator.__call__

    def failing(self, state):
        if int(state.step) == fail_at:
            raise RuntimeError("eval data went away")
        return evaluate(self, state)

    monkeypatch.setattr(Evaluator, "__call__", failing)
    run_dir = tmp_path / "run"
    saved = "saved" if fail_at % checkpoint_every == 0 else "saved now"
    with pytest.raises(loop.TrainingError, match=f"evaluation at step {fail_at} failed "
                                                 r"\(RuntimeError: eval data went away\); the "
                                                 f"checkpoint of step {fail_at} is {saved},"):
        loop.train(config_for(corpus, run_dir, 6, f"train.eval_every={fail_at}",
                              f"train.checkpoint_every={checkpoint_every}"),
                   run_dir, stream=io.StringIO())
    assert checkpoint_steps(run_dir) == [fail_at]
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        == list(range(1, fail_at))  # the failed step's row was never written


def test_any_failure_after_training_began_saves_the_last_good_step(corpus, tmp_path, monkeypatch):
    place = loop.global_batch
    calls = {"n": 0}

    def data_lost(local, sharding, rows):
        calls["n"] += 1
        if calls["n"] == 5:  # the batch of step 5 cannot be read: steps 1-4 are done
            raise OSError("the data disk went away")
        return place(local, sharding, rows)

    monkeypatch.setattr(loop, "global_batch", data_lost)
    run_dir = tmp_path / "run"
    shown = io.StringIO()
    with pytest.raises(OSError, match="the data disk went away"):
        loop.train(config_for(corpus, run_dir, 6, "train.log_every=3", "train.eval_every=0"),
                   run_dir, stream=shown)
    assert checkpoint_steps(run_dir) == [3, 4]
    assert "saved a checkpoint at step 4 before stopping on the error below" in shown.getvalue()


def test_preemption_on_the_final_step_still_exports(corpus, tmp_path, monkeypatch):
    place = loop.global_batch
    calls = {"n": 0}

    def preempted_on_the_last_batch(local, sharding, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return place(local, sharding, rows)

    monkeypatch.setattr(loop, "global_batch", preempted_on_the_last_batch)
    run_dir = tmp_path / "run"
    shown = io.StringIO()
    loop.train(config_for(corpus, run_dir, 2, "train.export_hf=true", "train.eval_every=0"),
               run_dir, stream=shown)
    assert "SIGTERM: saved a checkpoint at step 2; exiting" in shown.getvalue()
    assert checkpoint_steps(run_dir) == [2]
    assert (run_dir / "hf" / "config.json").is_file() and (run_dir / "hf" / "tokenizer.json").is_file()


def test_missing_data_path_fails_before_compiling(tmp_path):
    config = config_for(tmp_path / "nowhere", tmp_path / "run", 2)
    with pytest.raises(DataError, match="text input .*nowhere/doc\\*.txt' matches no file"):
        loop.train(config, tmp_path / "run", stream=io.StringIO())
    assert not (tmp_path / "run" / "checkpoints").exists()
