"""Runs a study: every run trains in its own folder under the study's, through the same
`train()` as train.py, and leaves `result.json` when done; then the table and the plots.

Resumable at two levels: a run with a `result.json` for the same configuration is skipped;
a run that was cut short resumes from its last checkpoint (train.py's exact resume), so a
study killed at any point and started again ends with the same results. A finished run asked
for more steps trains on from its checkpoint; one asked to change its trajectory (another
model, data or loss) is refused by train()'s resume check, naming the keys.

A skipped run's table values are computed again from its metrics (and its stored probe), so
a change to the measures reaches finished runs without training them again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from qnext_jax.data.build import TOKENIZER_FILE, make_tokenizer, packed_rows
from qnext_jax.data.pipeline import batch_dataset
from qnext_jax.experiments import measures
from qnext_jax.experiments.probes import probe_params
from qnext_jax.experiments.report import write_report
from qnext_jax.experiments.studies import Study
from qnext_jax.model import abstract_model
from qnext_jax.train.loop import train
from qnext_jax.train.metrics_log import read_metrics
from qnext_jax.train.run_config import RunConfig, load_run_config
from qnext_jax.train.run_dir import CONFIG_FILE, trajectory_changes

DEFAULT_RUN = Path(__file__).resolve().parents[2] / "configs" / "small.yaml"
RESULT_FILE = "result.json"
PROBED = ("first_token_attention", "max_activation")


class StudyStopped(RuntimeError):
    """A run stopped before its last step (a preemption notice): the study goes on when restarted."""


def study_configs(study: Study, out_dir: Path, extra: tuple[str, ...] = (),
                  seeds: tuple[int, ...] | None = None) -> list[tuple[str, str, int, RunConfig]]:
    """(run name, label, seed, config) of every run; loading them all first means a bad
    override fails before the first run trains."""
    runs = []
    for name, label, seed, overrides in study.runs(seeds):
        config = load_run_config(DEFAULT_RUN, [*overrides, *extra,
                                               f"train.run_dir={out_dir / name}"])
        runs.append((name, label, seed, config))
    return runs


def run_study(study: Study, out_dir: Path, extra: tuple[str, ...] = (),
              seeds: tuple[int, ...] | None = None, log=print) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name, label, seed, config in study_configs(study, out_dir, extra, seeds):
        run_dir = out_dir / name
        result_path = run_dir / RESULT_FILE
        if _finished(result_path, config):
            log(f"{study.name}: {name} is done ({result_path}); skipping it")
            probe = json.loads(result_path.read_text()).get("probe")
            results.append(_result(name, label, seed, config, run_dir, probe))
            continue
        if result_path.exists():
            log(f"{study.name}: {name} was trained with another configuration; training it on")
        log(f"{study.name}: training {name} in {run_dir}")
        _, state = train(config, run_dir)
        if int(state.step) < config.train.steps:
            raise StudyStopped(f"{name} stopped at step {int(state.step)}; run the study "
                               "again to continue")
        probe = _probe(config, run_dir, state) if set(PROBED) & set(study.measures) else None
        results.append(_result(name, label, seed, config, run_dir, probe))
        _write_result(result_path, results[-1])
    paths = write_report(study, results, out_dir)
    log(f"{study.name}: " + ", ".join(str(p) for p in paths))
    return results


def _finished(result_path: Path, config: RunConfig) -> bool:
    """A result of this run's step count and trajectory (its config.json against `config`)."""
    saved = result_path.parent / CONFIG_FILE
    if not (result_path.exists() and saved.exists()):
        return False
    same_steps = json.loads(result_path.read_text())["steps"] == config.train.steps
    return same_steps and not trajectory_changes(json.loads(saved.read_text()), config.to_dict())


def _result(name, label, seed, config: RunConfig, run_dir: Path, probe) -> dict:
    rows = read_metrics(run_dir)
    tokens_per_step = config.train.batch_size * config.train.seq_len
    run_curves = measures.curves(rows, tokens_per_step)
    return {"name": name, "label": label, "seed": seed, "steps": config.train.steps,
            "summary": measures.summary(rows, run_curves, probe), "curves": run_curves,
            "probe": probe}


def _probe(config: RunConfig, run_dir: Path, state) -> dict:
    """The probe on the first evaluation batch (the eval split, in order)."""
    tokenizer = make_tokenizer(config.data, config.model.vocab_size, run_dir / TOKENIZER_FILE)
    rows = packed_rows(config.data, tokenizer, config.train.seq_len + 1, "eval")
    data = batch_dataset(rows, config.train.batch_size, seed=0, shuffle=False, repeat=False)
    batch = jax.tree.map(lambda x: jax.numpy.asarray(np.asarray(x)), next(iter(data)))
    graphdef, _ = nnx.split(abstract_model(config.model, config.train.seed), nnx.Param)
    return probe_params(graphdef, jax.device_get(state.params), batch)


def _write_result(path: Path, result: dict) -> None:
    """Atomically: a study killed while writing leaves no half result that would be skipped."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=1))
    os.replace(partial, path)
