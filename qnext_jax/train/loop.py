"""The training loop: data and tokenizer, mesh and trainer, resume or init, steps, evaluation,
metrics, checkpoints, and the faults a long run meets (preemption, a non-finite loss).

Metrics stay on the device between log steps (no sync per step); at each log step they are
fetched together, checked for non-finite losses (the error names the first bad step, and no
checkpoint is ever written after it), appended to `metrics.jsonl` and the TensorBoard event
file, and shown in the progress bar. At the end (or at preemption) the loss curves and the
expert-load heatmap are drawn into run_dir.
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

from qnext_jax.convert.load import load_hf_state
from qnext_jax.convert.safetensors_dir import SafetensorsDir
from qnext_jax.convert.save import save_hf_checkpoint
from qnext_jax.data.build import make_tokenizer, packed_rows
from qnext_jax.data.pipeline import batch_dataset
from qnext_jax.parallel.axes import ShardingRules
from qnext_jax.parallel.distributed import global_batch
from qnext_jax.parallel.mesh import make_mesh
from qnext_jax.train.checkpoint import Checkpoints
from qnext_jax.train.losses import loss_terms, normalizers
from qnext_jax.train.optimizer import learning_rate_schedule, make_optimizer
from qnext_jax.train.run_config import RunConfig
from qnext_jax.train.plots import write_run_plots
from qnext_jax.train.progress import ProgressBar, Throughput, peak_tflops_per_device
from qnext_jax.train.step import (TrainState, abstract_model, abstract_state, check_batch_size,
                                  make_trainer, router_layer_names)
from qnext_jax.train.tensorboard import EventWriter

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


def train(config: RunConfig, run_dir: Path, stream=None):
    """Runs (or resumes) the configured training in `run_dir`; returns (last logged metrics,
    final train state). Progress goes to `stream` (default stdout) from process 0."""
    tc = config.train
    is_main = jax.process_index() == 0
    bar = ProgressBar(tc.steps, stream) if is_main else None
    log = bar.message if bar else (lambda text: None)
    config.data.check_paths()  # a missing path fails before any compilation
    mesh = make_mesh(config.mesh)
    rules = ShardingRules(config.model, mesh)
    check_batch_size(tc.batch_size, tc.micro_batches, mesh)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
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
    state = _initial_state(trainer, checkpoints, train_data, config, run_dir, log)
    start = int(state.step)

    evaluate = _evaluator(trainer, config, eval_rows, tc, rank, processes)
    sink = _MetricsSink(run_dir, resumed_at=start) if is_main else None
    throughput = Throughput(
        tc.batch_size * tc.seq_len, config.model.training_flops_per_token(tc.seq_len),
        jax.device_count(),
        tc.peak_tflops if tc.peak_tflops else peak_tflops_per_device(jax.devices()[0].device_kind),
        tc.steps,
    )
    preempted = Preempted()
    pending: list[tuple[int, dict]] = []
    last: dict = {}
    window_start, first_step = time.perf_counter(), start + 1
    try:
        for step in range(start + 1, tc.steps + 1):
            local = next(train_data)
            batch = global_batch(local, trainer.batch_sharding, tc.batch_size)
            state, metrics = trainer.step(state, batch)
            pending.append((step, metrics))
            final = step == tc.steps
            stop = preempted.requested  # read once: a signal arriving later stops after the next step
            save = final or step % tc.checkpoint_every == 0 or stop
            if step == first_step and not (save or step % tc.log_every == 0):
                # Time from the end of the first (compiling) step, logged with its window.
                jax.block_until_ready(metrics)
                window_start = time.perf_counter()
            if save or step % tc.log_every == 0:
                rows = _fetch_and_check(pending)  # raises before any save of a bad state
                seconds = time.perf_counter() - window_start  # after the fetch: steps are done
                counted, steady = len(rows), True
                if rows[0]["step"] == first_step:  # the compiling step: left out when possible
                    counted, steady = (len(rows) - 1, True) if len(rows) > 1 else (1, False)
                pending = []
                last = rows[-1]
                last.update(throughput.window(counted, seconds, steady=steady))
                if step % tc.eval_every == 0 or final:
                    last["eval_loss"] = evaluate(state)
                if sink:
                    sink.write(last)
                    bar.update(last, throughput.eta_seconds(step))
            if save:
                checkpoints.save(step, state, train_data.get_state(), force=True)
            if save or step % tc.log_every == 0:
                window_start = time.perf_counter()  # evaluation and saving are not training
            if stop:
                log(f"SIGTERM: saved a checkpoint at step {step}; exiting")
                break
        else:
            if tc.export_hf and int(state.step) == tc.steps:
                checkpoints.wait()
                path = export_hf(trainer, state, run_dir / "hf", write=is_main)
                log(f"exported the final model in Hugging Face format to {path}")
    finally:
        preempted.restore()
        checkpoints.close()
        if sink:
            sink.close()
            plots = write_run_plots(run_dir, router_layer_names(config.model))
            if bar:
                bar.close()
            if plots:
                log("plots: " + ", ".join(str(p) for p in plots))
    return last, state


def _initial_state(trainer, checkpoints: Checkpoints, train_data, config: RunConfig,
                   run_dir: Path, log) -> TrainState:
    """The latest checkpoint in run_dir (with the data position), else the Hugging Face
    weights of train.init_from_hf, else a fresh initialisation."""
    latest = checkpoints.latest_step()
    if latest is not None:
        state, data_state = checkpoints.restore(latest, abstract_state(trainer))
        train_data.set_state(data_state)
        log(f"resumed from step {latest} in {run_dir}")
        return state
    if config.train.init_from_hf:
        directory = config.train.init_from_hf
        files = SafetensorsDir(directory)
        _, abstract_params = abstract_model(config.model)
        params = load_hf_state(files, config.model, abstract_params,
                               dict(nnx.to_flat_state(trainer.state_shardings.params)).get)
        log(f"initialised from the Hugging Face checkpoint {directory}")
        return trainer.init_from(params)
    return trainer.init()


def export_hf(trainer, state: TrainState, directory: Path, write: bool = True) -> Path:
    """The parameters of `state` as a Hugging Face directory (process 0 writes; with several
    processes every process takes part in gathering each tensor)."""
    model = nnx.merge(trainer.graphdef, state.params)
    fetch = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        fetch = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return save_hf_checkpoint(model, directory, fetch=fetch, write=write)


class _MetricsSink:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, resumed_at: int):
        """Rows after `resumed_at`, logged by a run that died before its next checkpoint,
        describe lost work: they are dropped, as the resumed run logs those steps again."""
        path = run_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.endswith("}") and json.loads(line)["step"] <= resumed_at]
            path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = path.open("a")
        self.events = EventWriter(run_dir / "tensorboard")
        if resumed_at:
            self.events.restart(resumed_at + 1)

    def write(self, row: dict) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        scalars = {f"train/{k}": row[k] for k in (*SCALARS, "tokens_per_sec", "model_tflops", "mfu")
                   if k in row}
        if "eval_loss" in row:
            scalars["eval/ce_loss"] = row["eval_loss"]
        self.events.scalars(row["step"], scalars)

    def close(self) -> None:
        self.jsonl.close()
        self.events.close()


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
