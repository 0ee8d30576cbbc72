"""The parameters of a training run's checkpoint (run_dir/checkpoints/<step>/state), read
without the optimizer state (twice their size), with the model config the run trained.

For generation (`python -m qnext_jax.generate RUN_DIR`) and export to Hugging Face format
(`python -m qnext_jax.convert export RUN_DIR`) from any complete checkpoint of a run, a
preempted one's included.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from qnext_jax.config import ConfigError, ModelConfig
from qnext_jax.model import abstract_model
from qnext_jax.parallel.axes import param_axes

CHECKPOINTS, CONFIG = "checkpoints", "config.json"


def run_config_values(run_dir: Path) -> dict:
    """The run's config.json as written by train.py: {section: {key: value}}."""
    config_file = run_dir / CONFIG
    if not config_file.is_file():
        raise ConfigError(f"run directory {run_dir} has no {CONFIG}")
    return json.loads(config_file.read_text())


def complete_steps(run_dir: Path) -> list[int]:
    """Steps whose checkpoint finished writing (orbax renames a step's folder when done)."""
    checkpoints = run_dir / CHECKPOINTS
    if not checkpoints.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints.iterdir()
                  if p.name.isdigit() and (p / "state").is_dir())


def load_run_checkpoint(run_dir, step: int | None = None, *, param_dtype: str | None = None,
                        rules=None, **model_changes):
    """-> (model, step, config values) from `run_dir`'s checkpoint of `step` (default: the
    latest). param_dtype: the parameters' dtype (None: as trained; "float32" or "bfloat16":
    each array cast as orbax reads it, the whole model never held in the stored dtype; "auto":
    the run's compute dtype). rules: config -> the ShardingRules each parameter is read into
    the shards of, straight from the files (None: one device). model_changes: ModelConfig
    fields to override (how to compute, never shapes)."""
    run_dir = Path(run_dir).expanduser().absolute()  # orbax takes absolute paths only
    values = run_config_values(run_dir)
    config = ModelConfig.from_dict(values["model"], where=f"{run_dir / CONFIG} model").replace(
        **model_changes)
    if param_dtype == "auto":
        param_dtype = config.dtype if config.dtype in ("float32", "bfloat16") else "float32"
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
    checkpoints = run_dir / CHECKPOINTS
    steps = complete_steps(run_dir)
    if not steps:
        raise ConfigError(f"{checkpoints} holds no complete checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError(f"{checkpoints} has no checkpoint of step {step}; it has {steps}")
    graph, params = nnx.split(abstract_model(config), nnx.Param)
    if rules is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              params)
    else:
        rules = rules(config)
        placed = jax.tree.map(
            lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, v.value.dtype,
                                                     sharding=rules.sharding(param_axes(v)))),
            params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    target = {"params": placed}
    # Only the parameters: the optimizer's moments stay on disk.
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            checkpoints / str(step) / "state",
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
    except Exception as error:  # orbax raises many types; say which checkpoint and why
        raise ConfigError(f"cannot read the parameters of {checkpoints / str(step)}: "
                          f"{type(error).__name__}: {str(error)[:400]}") from error
    return nnx.merge(graph, restored["params"]), step, values
