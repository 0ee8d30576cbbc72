"""Hugging Face safetensors <-> qnext_jax, streaming, both directions."""

from qnext_jax.convert.load import load_hf_checkpoint
from qnext_jax.convert.safetensors_dir import CheckpointError
from qnext_jax.convert.save import save_hf_checkpoint

__all__ = ["CheckpointError", "load_hf_checkpoint", "save_hf_checkpoint"]
