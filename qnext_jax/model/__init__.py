"""The Qwen3-Next model in Flax NNX, one file per block."""

from qnext_jax.model.params import abstract_model
from qnext_jax.model.transformer import ModelOutput, Qwen3NextModel

__all__ = ["ModelOutput", "Qwen3NextModel", "abstract_model"]
