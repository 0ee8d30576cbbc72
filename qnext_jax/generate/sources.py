"""Where a model to generate from comes from: a training run directory (its latest checkpoint,
its model config and tokenizer) or a Hugging Face directory (config.json + safetensors)."""

from __future__ import annotations

from pathlib import Path

from qnext_jax.config import ConfigError
from qnext_jax.convert import load_hf_checkpoint
from qnext_jax.convert.run_checkpoint import CHECKPOINTS, load_run_checkpoint
from qnext_jax.data.tokenizer import load_tokenizer

TOKENIZER = "tokenizer.json"


def load_for_generation(path, *, step: int | None = None, **model_changes):
    """-> (model, tokenizer or None, a line saying what was loaded). model_changes: ModelConfig
    fields to override (how to compute, e.g. delta_rule_impl; never shapes)."""
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory: expected a run directory (with "
                          f"{CHECKPOINTS}/) or a Hugging Face model directory")
    tokenizer = load_tokenizer(path / TOKENIZER) if (path / TOKENIZER).is_file() else None
    if (path / CHECKPOINTS).is_dir():
        model, step, _ = load_run_checkpoint(path, step, **model_changes)
        return model, tokenizer, f"{path}: checkpoint of step {step}"
    if list(path.glob("*.safetensors")):
        if step is not None:
            raise ConfigError("--step picks a checkpoint of a run directory; "
                              f"{path} is a Hugging Face directory")
        return load_hf_checkpoint(path, **model_changes), tokenizer, f"{path}: Hugging Face weights"
    raise ConfigError(f"{path} holds neither {CHECKPOINTS}/ (a run directory) nor *.safetensors "
                      "(a Hugging Face directory)")
