"""Held-out evaluation: the main (CE) and MTP losses, and the MTP drafts' teacher-forced
acceptance rate per depth (train/mtp_acceptance.py), over the same eval batches every time.

Losses are means over every counted target of every eval batch (sums and counts added up,
then divided), not means of per-batch means. Each batch runs in the train step's
micro-batches (`train.micro_batches`), so a run whose step needs them to fit in memory
evaluates within the same memory.

Whether a run can evaluate is settled before anything is compiled: `train.eval_every=0`
turns evaluation off; otherwise the eval split must hold at least one global batch, and the
run evaluates on at most `train.eval_batches` batches of it, never repeating a row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qnext_jax.data.pipeline import batch_dataset
from qnext_jax.data.sources import DataError
from qnext_jax.parallel.distributed import global_batch, process_rows
from qnext_jax.train.losses import mtp_targets, prediction_loss_sums
from qnext_jax.train.mtp_acceptance import acceptance_counts
from qnext_jax.train.step import split_micro_batches


def eval_batch_count(eval_rows: int, batch_size: int, eval_batches: int, row_length: int) -> int:
    """Full global batches the eval split gives, at most `eval_batches`; an error if none."""
    available = eval_rows // batch_size
    if available == 0:
        raise DataError(
            f"the eval split has {eval_rows} rows of {row_length} tokens, fewer than one batch "
            f"(train.batch_size={batch_size}); hold out more data (data.eval_percent) or turn "
            "evaluation off (train.eval_every=0)"
        )
    return min(eval_batches, available)


class Evaluator:
    def __init__(self, trainer, config, eval_rows, num_batches: int):
        self.trainer, self.rows, self.num_batches = trainer, eval_rows, num_batches
        self.batch_size = config.train.batch_size
        self.has_mtp = bool(config.model.mtp_num_hidden_layers)
        depths = config.model.mtp_depth if self.has_mtp else 0
        micro_batches = config.train.micro_batches
        graphdef, loss_config = trainer.graphdef, config.loss
        batch_sharding = trainer.batch_sharding
        abstract_mesh = batch_sharding.mesh.abstract_mesh

        def micro_batch_sums(params, batch):
            """[ce, ce targets, mtp per depth..., mtp targets per depth..., draft matches per
            depth..., drafts counted per depth...] summed over this micro-batch."""
            model = nnx.merge(graphdef, params)
            output = model(batch.input_ids, positions=batch.positions,
                           segment_ids=batch.segment_ids, valid=batch.valid,
                           mtp=self.has_mtp, logits=not loss_config.fused_head)
            head = model.head_weight()
            ce, mtp = prediction_loss_sums(output, batch, loss_config, head)
            mtp_counted = [jnp.sum(mtp_targets(batch, k)[1]) for k in range(1, depths + 1)]
            parts = [ce[None], jnp.sum(batch.loss_mask)[None], mtp, jnp.asarray(mtp_counted)]
            if self.has_mtp:
                parts += list(acceptance_counts(output, batch, head))
            return jnp.concatenate([p.astype(jnp.float32).reshape(-1) for p in parts])

        @jax.jit
        def eval_sums(params, batch):
            with jax.sharding.use_abstract_mesh(abstract_mesh):
                if micro_batches == 1:
                    return micro_batch_sums(params, batch)
                micro = split_micro_batches(batch, micro_batches, batch_sharding)
                return jax.lax.map(lambda mb: micro_batch_sums(params, mb), micro).sum(0)

        self.depths = depths
        self.eval_sums = eval_sums

    def __call__(self, state) -> dict[str, float]:
        held_rows = process_rows(self.batch_size, self.trainer.batch_sharding)
        data = batch_dataset(self.rows, self.batch_size, seed=0, held_rows=held_rows,
                             shuffle=False, repeat=False)
        total = 0.0
        for local, _ in zip(data, range(self.num_batches)):
            batch = global_batch(local, self.trainer.batch_sharding, self.batch_size)
            total = total + self.eval_sums(state.params, batch)
        sums = np.asarray(total, np.float64)
        d = self.depths
        ce, targets = sums[0], sums[1]
        result = {"eval_loss": float(ce / max(targets, 1.0))}
        if not self.has_mtp:
            return result
        mtp, mtp_targets_, matches, counted = (sums[2 + i * d: 2 + (i + 1) * d] for i in range(4))
        result["eval_mtp_loss"] = float(np.mean(mtp / np.maximum(mtp_targets_, 1.0)))
        result["eval_mtp_acceptance"] = [float(m / c) if c else float("nan")
                                         for m, c in zip(matches, counted)]
        return result
