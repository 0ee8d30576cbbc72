"""Held-out evaluation against float64 NumPy: the losses are means over every counted target of
all eval batches (a batch that is mostly padding weighs what its tokens weigh), and each batch
runs in the train step's micro-batches with the same result."""

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT
from qnext_jax.data.batch import batch_from_packed_rows
from qnext_jax.data.pipeline import InMemoryRows
from qnext_jax.train.evaluation import Evaluator
from qnext_jax.train.losses import mtp_targets
from qnext_jax.train.run_config import load_run_config
from step_setup import MeshConfig, trainer_for

ROWS, LENGTH = 4, 32


def run_config(micro_batches):
    return load_run_config(None, [
        f"model.preset={REPO_ROOT / 'configs' / 'tiny.yaml'}", "model.num_hidden_layers=4",
        "train.batch_size=2", f"train.seq_len={LENGTH}", f"train.micro_batches={micro_batches}",
    ])


@pytest.fixture(scope="module")
def eval_rows():
    """Two batches of two rows: the first full, the second almost all padding."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (ROWS, LENGTH + 1))
    segments = np.ones((ROWS, LENGTH + 1), np.int32)
    segments[:, 20:] = 2
    segments[2, 6:] = 0
    segments[3, 3:] = 0
    return InMemoryRows(tokens, segments)


def float64_losses(model, rows):
    """(mean CE over every counted target, mean MTP CE) of all rows at once."""
    batch = batch_from_packed_rows(rows.tokens, rows.segment_ids)
    out = model(batch.input_ids, positions=batch.positions, segment_ids=batch.segment_ids,
                valid=batch.valid)

    def mean_ce(logits, targets, mask):
        logits = np.asarray(logits, np.float64)
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
        ce = lse - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
        mask = np.asarray(mask, np.float64)
        return (ce * mask).sum() / mask.sum()

    targets, mask = mtp_targets(batch, 1)
    return (mean_ce(out.logits, batch.targets, batch.loss_mask),
            mean_ce(out.mtp_logits[0], targets, mask))


@pytest.fixture(scope="module")
def evaluations(eval_rows):
    results = {}
    for micro_batches in (1, 2):
        config = run_config(micro_batches)
        trainer = trainer_for(config.model, MeshConfig(fsdp=1), jax.devices()[:1],
                              micro_batches=micro_batches)
        state = trainer.init()
        evaluate = Evaluator(trainer, config, eval_rows, num_batches=2)
        batch = jax.tree.map(lambda x: x[:2], batch_from_packed_rows(eval_rows.tokens,
                                                                    eval_rows.segment_ids))
        flops = evaluate.eval_sums.lower(state.params, batch).cost_analysis()["flops"]
        results[micro_batches] = (evaluate(state), flops, trainer, state)
    return results


def test_eval_losses_weigh_every_target_alike(evaluations, eval_rows):
    result, _, trainer, state = evaluations[1]
    model = nnx.merge(trainer.graphdef, state.params)
    ce, mtp = float64_losses(model, eval_rows)
    assert result["eval_loss"] == pytest.approx(ce, rel=1e-5)
    assert result["eval_mtp_loss"] == pytest.approx(mtp, rel=1e-5)
    assert 0.0 <= result["eval_mtp_acceptance"][0] <= 1.0


def test_eval_runs_in_the_train_steps_micro_batches(evaluations):
    """Same numbers; the compiled batch is a loop whose body (counted once by XLA's cost
    analysis) is half the batch."""
    (whole, whole_flops, *_), (split, split_flops, *_) = evaluations[1], evaluations[2]
    assert split["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-5)
    assert split["eval_mtp_loss"] == pytest.approx(whole["eval_mtp_loss"], rel=1e-5)
    assert split["eval_mtp_acceptance"] == pytest.approx(whole["eval_mtp_acceptance"])
    assert split_flops < 0.6 * whole_flops
