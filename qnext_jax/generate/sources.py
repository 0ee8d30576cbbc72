"""Where a model to generate from comes from: a training run directory (its latest checkpoint,
its model config and tokenizer) or a Hugging Face directory (config.json + safetensors).

Parameters are read in the dtype generation computes in (by default the model's compute dtype:
bf16 for the released 80B and for bf16 runs), tensor by tensor, so no copy of the whole model
in a wider dtype is ever made: a Hugging Face directory's safetensors are converted as each
parameter is assembled, a run's fp32 checkpoint is cast by orbax as each array is read. In the
compute dtype every weight is used as it lies (no cast inside each decode step).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp

from qnext_jax.config import ConfigError, ModelConfig
from qnext_jax.convert import load_hf_checkpoint
from qnext_jax.convert.run_checkpoint import CHECKPOINTS, load_run_checkpoint
from qnext_jax.data.tokenizer import load_tokenizer
from qnext_jax.generate.sharding import generation_rules, shardings_by_path

TOKENIZER = "tokenizer.json"
DTYPES = ("auto", "float32", "bfloat16")


def load_for_generation(path, *, step: int | None = None, dtype: str = "auto", mesh=None,
                        **model_changes):
    """-> (model, tokenizer or None, a line saying what was loaded). dtype: the parameters'
    ("auto": the model's compute dtype). mesh: every parameter read straight into its shards
    on it (generate/sharding.py); None: one device. model_changes: ModelConfig fields to
    override (how to compute, e.g. delta_rule_impl; never shapes)."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory: expected a run directory (with "
                          f"{CHECKPOINTS}/) or a Hugging Face model directory")
    tokenizer = load_tokenizer(path / TOKENIZER) if (path / TOKENIZER).is_file() else None
    if (path / CHECKPOINTS).is_dir():
        model, step, _ = load_run_checkpoint(
            path, step, param_dtype=dtype, rules=None if mesh is None else
            lambda config: generation_rules(config, mesh), **model_changes)
        return model, tokenizer, (f"{path}: checkpoint of step {step}, parameters in "
                                  f"{model.config.param_dtype}")
    if list(path.glob("*.safetensors")):
        if step is not None:
            raise ConfigError("--step picks a checkpoint of a run directory; "
                              f"{path} is a Hugging Face directory")
        config = ModelConfig.from_hf(path).replace(**model_changes)
        if dtype == "auto":
            dtype = "bfloat16" if jnp.dtype(config.dtype) == jnp.bfloat16 else "float32"
        shardings = None if mesh is None else shardings_by_path(config, mesh)
        model = load_hf_checkpoint(path, dtype, shardings=shardings, **model_changes)
        return model, tokenizer, f"{path}: Hugging Face weights in {dtype}"
    raise ConfigError(f"{path} holds neither {CHECKPOINTS}/ (a run directory) nor *.safetensors "
                      "(a Hugging Face directory)")

