"""The training loop: checks, data and tokenizer, mesh and trainer, resume or init, steps,
checkpoints, evaluation and metrics, and the faults a long run meets.

Order of work at a step that logs: fetch the pending metrics and check the losses (a
non-finite loss is an error naming its step, and no checkpoint is ever written of that state),
start the checkpoint's save, then evaluate, then write the metrics. An evaluation that fails
saves the state it was evaluating (if this step was no save step) before the error goes up;
a metrics sink that fails is switched off (metrics_log); any other failure after training
began saves the last completed step before it goes up. With several processes a save needs
all of them, so there every evaluation step is a save step and a failure saves nothing more.

Metrics stay on the device between log steps (no sync per step). At the end (or at
preemption) the loss curves and the expert-load heatmap are drawn into run_dir.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from qnext_jax.config import ConfigError
from qnext_jax.convert.load import load_hf_state
from qnext_jax.convert.safetensors_dir import SafetensorsDir
from qnext_jax.data.build import TOKENIZER_FILE, make_tokenizer, packed_rows
from qnext_jax.data.pipeline import batch_dataset
from qnext_jax.model import abstract_model
from qnext_jax.parallel.axes import ShardingRules
from qnext_jax.parallel.distributed import global_batch, process_rows
from qnext_jax.parallel.mesh import make_mesh
from qnext_jax.train.checkpoint import Checkpoints
from qnext_jax.train.evaluation import Evaluator, eval_batch_count
from qnext_jax.train.export import export_dtype, export_hf
from qnext_jax.train.memory_check import compile_checked, device_memory_limit
from qnext_jax.train.metrics_log import SCALARS, MetricsLog, check_wandb
from qnext_jax.train.plots import write_run_plots
from qnext_jax.train.preemption import Preemption
from qnext_jax.train.progress import ProgressBar, Throughput, peak_tflops_per_device
from qnext_jax.train.run_config import RunConfig, check_run_config
from qnext_jax.train.run_dir import check_resume_config, write_config
from qnext_jax.train.step import (TrainState, abstract_state, check_batch_size,
                                  check_sequence_split, check_trainable_dtypes,
                                  router_layer_names, trainer_for_run)


CHECKPOINT_DIR = "checkpoints"


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a failed evaluation); the message names the step."""


def train(config: RunConfig, run_dir: Path, stream=None):
    """Runs (or resumes) the configured training in `run_dir`; returns (last logged metrics,
    final train state). Progress goes to `stream` (default stdout) from process 0."""
    tc = config.train
    is_main = jax.process_index() == 0
    # ---- Everything that can be known without compiling, before anything is written.
    check_run_config(config)
    check_trainable_dtypes(config.model)
    config.data.check_paths(evaluate=tc.eval_every > 0)
    check_wandb(tc.wandb_project)
    mesh = make_mesh(config.mesh)
    rules = ShardingRules(config.model, mesh)
    check_batch_size(tc.batch_size, tc.micro_batches, mesh)
    check_sequence_split(tc.seq_len, mesh, config.model)
    # What a run that never completes a step writes is removed again (a folder it created
    # included); a folder that held anything before is never touched.
    created = not run_dir.exists()
    fresh = created or not any(run_dir.iterdir())
    checkpoints = bar = sink = None
    try:
        if (run_dir / CHECKPOINT_DIR).is_dir():  # otherwise created once the inputs are known
            checkpoints = Checkpoints(run_dir / CHECKPOINT_DIR, keep=tc.keep_checkpoints)
        start = (checkpoints.latest_step() if checkpoints else None) or 0
        if start > tc.steps:
            raise ConfigError(f"train.steps={tc.steps} is below step {start} of the latest "
                              f"checkpoint in {run_dir}; pass train.steps >= {start}")
        bar = ProgressBar(tc.steps, stream, initial=start) if is_main else None
        log = bar.message if bar else (lambda text: None)
        if start:
            check_resume_config(run_dir, config.to_dict(), tc.accept_changes, log)
            if start == tc.steps:
                log(f"{run_dir} is already trained to step {start} of {tc.steps}: no steps to run")

        # A resumed run keeps the tokenizer it trained with; a fresh one makes its own.
        tokenizer = make_tokenizer(config.data, config.model.vocab_size,
                                   run_dir / TOKENIZER_FILE if start else None)
        row_length = tc.seq_len + 1
        train_rows = packed_rows(config.data, tokenizer, row_length, "train")
        held_rows = process_rows(tc.batch_size, rules.batch_sharding())
        train_data = iter(batch_dataset(train_rows, tc.batch_size, seed=config.data.seed,
                                        held_rows=held_rows))
        eval_rows = num_eval_batches = None
        if tc.eval_every:
            eval_rows = packed_rows(config.data, tokenizer, row_length, "eval")
            num_eval_batches = eval_batch_count(len(eval_rows), tc.batch_size, tc.eval_batches,
                                                row_length)

        # ---- The inputs are good: the run directory.
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config.to_dict())
        if is_main:
            tokenizer.save(run_dir / TOKENIZER_FILE)
        if checkpoints is None:
            checkpoints = Checkpoints(run_dir / CHECKPOINT_DIR, keep=tc.keep_checkpoints)
        if tc.eval_every and num_eval_batches < tc.eval_batches:
            log(f"evaluating on {num_eval_batches} batches (train.eval_batches="
                f"{tc.eval_batches}): the eval split holds no more without repeating rows")
        log(f"dtypes: parameters {config.model.param_dtype}, compute {config.model.dtype}"
            + (f", export {export_dtype(config)}" if tc.export_hf else ""))

        # ---- Compilation and the initial state.
        trainer = trainer_for_run(config, rules)
        if tc.check_memory:  # on a GPU/TPU: compiled, and checked, before any allocation
            trainer = compile_checked(trainer, config, device_memory_limit(trainer))
        state = _initial_state(trainer, checkpoints, start, train_data, config, run_dir, log)
        evaluate = Evaluator(trainer, config, eval_rows, num_eval_batches) if tc.eval_every else None
        sink = MetricsLog(run_dir, resumed_at=start, run_config=config.to_dict(),
                          wandb_project=tc.wandb_project, wandb_mode=tc.wandb_mode,
                          log=log) if is_main else None
    except BaseException:
        _close(checkpoints, sink, bar)
        if fresh and is_main:
            _remove_unstarted(run_dir, created)
        raise
    run = _Run(config, trainer, checkpoints, train_data, sink, bar, log)
    try:
        state = run.steps(state, start, evaluate)
        if tc.export_hf and int(state.step) == tc.steps:
            checkpoints.wait()
            path = export_hf(trainer, state, config, run_dir, tokenizer)
            log(f"exported the final model in Hugging Face format to {path}")
    finally:
        try:
            checkpoints.wait()
        finally:
            _close(checkpoints, sink, None)
        if sink and (run.trained or not fresh):
            try:
                plots = write_run_plots(run_dir, router_layer_names(config.model),
                                        tc.plot_log_steps)
                log("plots: " + ", ".join(str(p) for p in plots))
            except Exception as error:  # a picture is never worth the run's exit status
                log(f"warning: drawing the plots failed ({type(error).__name__}: {error})")
        _close(None, None, bar)
        if fresh and not run.trained and is_main:
            _remove_unstarted(run_dir, created)  # the first step failed: nothing to look at
    return run.last, state


class _Run:
    """The step loop and what it must never lose."""

    def __init__(self, config, trainer, checkpoints, train_data, sink, bar, log):
        self.tc, self.trainer, self.checkpoints = config.train, trainer, checkpoints
        self.train_data, self.sink, self.bar, self.log = train_data, sink, bar, log
        self.throughput = Throughput(
            self.tc.batch_size * self.tc.seq_len,
            config.model.training_flops_per_token(self.tc.seq_len), jax.device_count(),
            self.tc.peak_tflops or peak_tflops_per_device(jax.devices()[0].device_kind),
            self.tc.steps,
        )
        self.last: dict = {}
        self.saved_step = -1
        self.trained = False  # whether this start completed any step

    def save(self, step: int, state) -> None:
        self.saved_step = step  # first: a save cut short is never started again over itself
        self.checkpoints.save(step, state, self.train_data.get_state(), force=True)

    def steps(self, state: TrainState, start: int, evaluate) -> TrainState:
        tc = self.tc
        preemption = Preemption()
        pending: list[tuple[int, dict]] = []
        window_start, first_step = time.perf_counter(), start + 1
        done, intact = start, True  # the last completed step; whether `state` still holds it
        self.saved_step = start
        # A save is a collective: with several processes, one that fails alone cannot save
        # by itself. So there every evaluation step is also a save step, and a failure does
        # not save (the others would wait for it in the next step).
        alone = jax.process_count() == 1
        try:
            for step in range(start + 1, tc.steps + 1):
                local = next(self.train_data)
                batch = global_batch(local, self.trainer.batch_sharding, tc.batch_size)
                intact = False  # the step consumes (donates) the state
                state, metrics = self.trainer.step(state, batch)
                intact, done, self.trained = True, step, True
                pending.append((step, metrics))
                final = step == tc.steps
                stop = preemption.reached(step)  # the same step on every process
                evaluating = evaluate is not None and (step % tc.eval_every == 0 or final)
                save = final or step % tc.checkpoint_every == 0 or stop or (evaluating and not alone)
                logging = save or evaluating or step % tc.log_every == 0
                if step == first_step and not logging:
                    # Time from the end of the first (compiling) step, logged with its window.
                    jax.block_until_ready(metrics)
                    window_start = time.perf_counter()
                if logging:
                    rows = _fetch_and_check(pending)  # raises before any save of a bad state
                    pending = []
                    seconds = time.perf_counter() - window_start  # after the fetch: steps done
                    counted, steady = len(rows), True
                    if rows[0]["step"] == first_step:  # the compiling step: left out if possible
                        counted, steady = (len(rows) - 1, True) if len(rows) > 1 else (1, False)
                    self.last = rows[-1]
                    self.last.update(self.throughput.window(counted, seconds, steady=steady))
                    if save:
                        self.save(step, state)  # before evaluating: an eval failure costs nothing
                    if evaluating:
                        self.last.update(self._evaluate(evaluate, state, step))
                    if self.sink:
                        self.sink.write(self.last)
                        self.bar.update(self.last, self.throughput.eta_seconds(step))
                    window_start = time.perf_counter()  # evaluation and saving are not training
                if stop:
                    self.log(f"{preemption.reason}: saved a checkpoint at step {step}; exiting")
                    break
        except TrainingError:
            raise  # a non-finite loss or a failed evaluation: handled where it was raised
        except KeyboardInterrupt:
            if preemption.requested:  # the second Ctrl-C: stop now, no save
                raise
            self._failing(alone, intact, done, state, pending)
            raise
        except BaseException:
            self._failing(alone, intact, done, state, pending)
            raise
        finally:
            preemption.restore()
        return state

    def _evaluate(self, evaluate, state, step: int) -> dict:
        try:
            return evaluate(state)
        except Exception as error:
            saved = self.saved_step == step  # always, with several processes
            if not saved:
                self.save(step, state)
            raise TrainingError(
                f"evaluation at step {step} failed ({type(error).__name__}: {error}); the "
                f"checkpoint of step {step} is {'saved' if saved else 'saved now'}, so the run "
                "resumes from it"
            ) from error

    def _failing(self, alone: bool, intact: bool, step: int, state, pending) -> None:
        """The run is going down with `state` at `step`: keep it if the state is intact (not
        consumed by a step that failed), its losses are good, and this process can save alone."""
        if not intact or step <= self.saved_step:
            return
        if not alone:
            self.log(f"not saving step {step} before stopping: a save needs every process")
            return
        try:
            _fetch_and_check(pending)
            self.save(step, state)
            self.log(f"saved a checkpoint at step {step} before stopping on the error below")
        except Exception as error:  # the original error matters more than this one
            self.log(f"could not save step {step} before stopping: {error}")


def _close(checkpoints, sink, bar) -> None:
    """Closes what is open, on every way out (an open checkpoint manager's threads outlive the
    interpreter's shutdown and fail noisily)."""
    if checkpoints is not None:
        checkpoints.close()
    if sink is not None:
        sink.close()
    if bar is not None:
        bar.close()


def _remove_unstarted(run_dir: Path, created: bool) -> None:
    """A run that never completed a step leaves nothing behind: what it wrote into a folder
    that was empty, and the folder too if it made it."""
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for path in run_dir.iterdir() if run_dir.is_dir() else ():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _initial_state(trainer, checkpoints: Checkpoints, latest: int, train_data,
                   config: RunConfig, run_dir: Path, log) -> TrainState:
    """The latest checkpoint in run_dir (with the data position), else the Hugging Face
    weights of train.init_from_hf, else a fresh initialisation."""
    if latest:
        state, data_state = checkpoints.restore(latest, abstract_state(trainer))
        train_data.set_state(data_state)
        log(f"resumed from step {latest} in {run_dir}")
        return state
    if config.train.init_from_hf:
        directory = config.train.init_from_hf
        files = SafetensorsDir(directory)
        _, abstract_params = nnx.split(abstract_model(config.model), nnx.Param)
        params = load_hf_state(files, config.model, abstract_params,
                               dict(nnx.to_flat_state(trainer.state_shardings.params)).get)
        log(f"initialised from the Hugging Face checkpoint {directory}")
        return trainer.init_from(params)
    return trainer.init()


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
