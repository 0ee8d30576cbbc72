"""Text in, packed token rows out: sources, tokenizers, packing and the grain pipeline."""

from qnext_jax.data.sources import DataError

__all__ = ["DataError"]
