"""The training loop: data and tokenizer, mesh and trainer, resume or init, steps, evaluation,
metrics, checkpoints, and the faults a long run meets (preemption, a non-finite loss).

Metrics stay on the device between log steps (no sync per step); at each log step they are
fetched together, checked for non-finite losses (the error names the first bad step, and no
checkpoint is ever written after it) and appended to `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qnext_jax.data.build import make_tokenizer, packed_rows
from qnext_jax.data.pipeline import batch_dataset
from qnext_jax.parallel.axes import ShardingRules
from qnext_jax.parallel.distributed import global_batch
from qnext_jax.parallel.mesh import make_mesh
from qnext_jax.train.checkpoint import Checkpoints
from qnext_jax.train.losses import loss_terms, normalizers
from qnext_jax.train.optimizer import learning_rate_schedule, make_optimizer
from qnext_jax.train.run_config import RunConfig
from qnext_jax.train.step import abstract_state, check_batch_size, make_trainer

SCALARS = ("loss", "ce_loss", "mtp_loss", "lbl_loss", "z_loss", "grad_norm", "lr")


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message names the step."""


class Preempted:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def new_run_dir(root: Path = Path("runs")) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        path, n = root / f"{stamp}-{n}", n + 1
    return path


def train(config: RunConfig, run_dir: Path, log=print):
    """Runs (or resumes) the configured training in `run_dir`; returns (last logged metrics,
    final train state)."""
    tc = config.train
    run_dir.mkdir(parents=True, exist_ok=True)
    config.data.check_paths()  # a missing path fails before any compilation
    mesh = make_mesh(config.mesh)
    rules = ShardingRules(config.model, mesh)
    check_batch_size(tc.batch_size, tc.micro_batches, mesh)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    tokenizer = make_tokenizer(config.data, config.model.vocab_size, run_dir)
    row_length = tc.seq_len + 1
    train_rows = packed_rows(config.data, tokenizer, row_length, "train")
    eval_rows = packed_rows(config.data, tokenizer, row_length, "eval")
    processes, rank = jax.process_count(), jax.process_index()
    local_rows = tc.batch_size // processes
    train_data = iter(batch_dataset(train_rows, local_rows, seed=config.data.seed,
                                    process_index=rank, process_count=processes))

    trainer = make_trainer(config.model, make_optimizer(config.optimizer),
                           learning_rate_schedule(config.optimizer), rules,
                           loss_config=config.loss, micro_batches=tc.micro_batches, seed=tc.seed)
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=tc.keep_checkpoints)
    latest = checkpoints.latest_step()
    if latest is not None:
        state, data_state = checkpoints.restore(latest, abstract_state(trainer))
        train_data.set_state(data_state)
        log(f"resumed from step {latest} in {run_dir}")
    else:
        state = trainer.init()
    start = int(state.step)

    evaluate = _evaluator(trainer, config, eval_rows, tc, rank, processes)
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    preempted = Preempted()
    pending: list[tuple[int, dict]] = []
    last: dict = {}
    tokens_per_step = tc.batch_size * tc.seq_len
    clock = time.perf_counter()
    try:
        for step in range(start + 1, tc.steps + 1):
            local = next(train_data)
            batch = global_batch(local, trainer.batch_sharding, tc.batch_size)
            state, metrics = trainer.step(state, batch)
            pending.append((step, metrics))
            final = step == tc.steps
            save = final or step % tc.checkpoint_every == 0 or preempted.requested
            if save or step % tc.log_every == 0:
                rows = _fetch_and_check(pending)  # raises before any save of a bad state
                elapsed = time.perf_counter() - clock  # after the fetch: the steps are done
                rate = len(pending) * tokens_per_step / elapsed
                pending = []
                last = rows[-1]
                last["tokens_per_sec"] = rate
                if step % tc.eval_every == 0 or final:
                    last["eval_loss"] = evaluate(state)
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                log(_progress_line(last, tc.steps))
            if save:
                checkpoints.save(step, state, train_data.get_state(), force=True)
            if save or step % tc.log_every == 0:
                clock = time.perf_counter()  # evaluation and saving are not training time
            if preempted.requested:
                log(f"SIGTERM: saved step {step}; exiting")
                break
    finally:
        preempted.restore()
        metrics_file.close()
        checkpoints.close()
    return last, state


def _fetch_and_check(pending) -> list[dict]:
    rows = []
    for step, metrics in pending:
        values = {k: float(metrics[k]) for k in SCALARS}
        if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm")):
            raise TrainingError(
                f"non-finite loss at step {step} (loss {values['loss']}, grad_norm "
                f"{values['grad_norm']}); stopping without a checkpoint of this state"
            )
        row = {"step": step, **values}
        row["expert_load"] = np.asarray(metrics["expert_load"]).round(5).tolist()
        rows.append(row)
    return rows


def _evaluator(trainer, config: RunConfig, eval_rows, tc, rank, processes):
    """Mean of the main and MTP losses over the same `eval_batches` held-out batches."""
    local_rows = tc.batch_size // processes
    graphdef = trainer.graphdef
    mtp_depth = config.model.mtp_depth if config.model.mtp_num_hidden_layers else 0

    @jax.jit
    def eval_step(params, batch):
        with jax.sharding.use_abstract_mesh(trainer.batch_sharding.mesh.abstract_mesh):
            model = nnx.merge(graphdef, params)
            output = model(batch.input_ids, positions=batch.positions,
                           segment_ids=batch.segment_ids, valid=batch.valid)
            terms = loss_terms(output, batch, normalizers(batch, mtp_depth), config.loss, 0.0)
        return terms["ce_loss"]

    def evaluate(state) -> float:
        data = batch_dataset(eval_rows, local_rows, seed=0, process_index=rank,
                             process_count=processes, shuffle=False)
        losses = []
        for local, _ in zip(data, range(tc.eval_batches)):
            batch = global_batch(local, trainer.batch_sharding, tc.batch_size)
            losses.append(eval_step(state.params, batch))
        return float(jnp.mean(jnp.stack(losses)))

    return evaluate


def _progress_line(row: dict, total_steps: int) -> str:
    text = (f"step {row['step']}/{total_steps}  loss {row['loss']:.4f}  ce {row['ce_loss']:.4f}  "
            f"mtp {row['mtp_loss']:.4f}  lbl {row['lbl_loss']:.3f}  |g| {row['grad_norm']:.3f}  "
            f"{row['tokens_per_sec']:,.0f} tok/s")
    if "eval_loss" in row:
        text += f"  eval {row['eval_loss']:.4f}"
    return text


