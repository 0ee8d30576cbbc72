"""Where a model to generate from comes from: a training run directory (its latest checkpoint,
its model config and tokenizer) or a Hugging Face directory (config.json + safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from qnext_jax.config import ConfigError, ModelConfig
from qnext_jax.convert import load_hf_checkpoint
from qnext_jax.model import abstract_model
from qnext_jax.data.tokenizer import load_tokenizer

CHECKPOINTS, TOKENIZER = "checkpoints", "tokenizer.json"


def load_for_generation(path, *, step: int | None = None, **model_changes):
    """-> (model, tokenizer or None, a line saying what was loaded). model_changes: ModelConfig
    fields to override (how to compute, e.g. delta_rule_impl; never shapes)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory: expected a run directory (with "
                          f"{CHECKPOINTS}/) or a Hugging Face model directory")
    tokenizer = load_tokenizer(path / TOKENIZER) if (path / TOKENIZER).is_file() else None
    if (path / CHECKPOINTS).is_dir():
        model, step = _from_run(path, step, model_changes)
        return model, tokenizer, f"{path}: checkpoint of step {step}"
    if list(path.glob("*.safetensors")):
        if step is not None:
            raise ConfigError("--step picks a checkpoint of a run directory; "
                              f"{path} is a Hugging Face directory")
        return load_hf_checkpoint(path, **model_changes), tokenizer, f"{path}: Hugging Face weights"
    raise ConfigError(f"{path} holds neither {CHECKPOINTS}/ (a run directory) nor *.safetensors "
                      "(a Hugging Face directory)")


def _from_run(run_dir: Path, step: int | None, model_changes):
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"run directory {run_dir} has no config.json")
    values = json.loads(config_file.read_text())
    config = ModelConfig.from_dict(values["model"], where=f"{config_file} model").replace(
        **model_changes)
    checkpoints = run_dir / CHECKPOINTS
    steps = sorted(int(p.name) for p in checkpoints.iterdir()
                   if p.name.isdigit() and (p / "state").is_dir())
    if not steps:
        raise ConfigError(f"{checkpoints} holds no complete checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError(f"{checkpoints} has no checkpoint of step {step}; it has {steps}")
    graph, params = nnx.split(abstract_model(config), nnx.Param)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)}
    # Only the parameters: the optimizer's moments (twice their size) stay on disk.
    try:
        restored = ocp.PyTreeCheckpointer().restore(
            checkpoints / str(step) / "state",
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
    except Exception as error:  # orbax raises many types; say which checkpoint and why
        raise ConfigError(f"cannot read the parameters of {checkpoints / str(step)}: "
                          f"{type(error).__name__}: {str(error)[:400]}") from error
    return nnx.merge(graph, restored["params"]), step
