"""Held-out evaluation: the main (CE) and MTP losses, and the MTP drafts' teacher-forced
acceptance rate per depth (train/mtp_acceptance.py), over the same eval batches every time.

Whether a run can evaluate is settled before anything is compiled: `train.eval_every=0`
turns evaluation off; otherwise the eval split must hold at least one global batch, and the
run evaluates on at most `train.eval_batches` batches of it, never repeating a row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.data.pipeline import batch_dataset
from qnext_jax.data.sources import DataError
from qnext_jax.parallel.distributed import global_batch
from qnext_jax.train.losses import loss_terms, normalizers
from qnext_jax.train.mtp_acceptance import acceptance_counts


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
        mtp_depth = config.model.mtp_depth if self.has_mtp else 0
        graphdef, loss_config = trainer.graphdef, config.loss
        abstract_mesh = trainer.batch_sharding.mesh.abstract_mesh

        @jax.jit
        def eval_step(params, batch):
            with jax.sharding.use_abstract_mesh(abstract_mesh):
                model = nnx.merge(graphdef, params)
                output = model(batch.input_ids, positions=batch.positions,
                               segment_ids=batch.segment_ids, valid=batch.valid,
                               mtp=self.has_mtp, logits=not loss_config.fused_head)
                head = model.head_weight()
                terms = loss_terms(output, batch, normalizers(batch, mtp_depth), loss_config, 0.0,
                                   head=head)
                accepted = acceptance_counts(output, batch, head) if self.has_mtp else ()
            return terms["ce_loss"], terms["mtp_loss"], accepted

        self.eval_step = eval_step

    def __call__(self, state) -> dict[str, float]:
        processes, rank = jax.process_count(), jax.process_index()
        data = batch_dataset(self.rows, self.batch_size // processes, seed=0, process_index=rank,
                             process_count=processes, shuffle=False, repeat=False)
        losses, matches, counted = [], 0.0, 0.0
        for local, _ in zip(data, range(self.num_batches)):
            batch = global_batch(local, self.trainer.batch_sharding, self.batch_size)
            ce, mtp, accepted = self.eval_step(state.params, batch)
            losses.append((ce, mtp))
            if accepted:
                matches, counted = matches + accepted[0], counted + accepted[1]
        ce, mtp = (float(jnp.mean(jnp.stack(parts))) for parts in zip(*losses))
        if not self.has_mtp:
            return {"eval_loss": ce}
        rates = [float(m / c) if c else float("nan") for m, c in zip(matches, counted)]
        return {"eval_loss": ce, "eval_mtp_loss": mtp, "eval_mtp_acceptance": rates}
