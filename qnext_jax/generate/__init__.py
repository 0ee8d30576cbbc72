"""Generation: KV and DeltaNet caches, prefill and decode, sampling, MTP self-speculative
decoding (`python -m qnext_jax.generate` is the command line)."""

from qnext_jax.generate.generator import Generation, Generator
from qnext_jax.generate.sampling import SamplingSettings, sample, token_probabilities

__all__ = ["Generation", "Generator", "SamplingSettings", "sample", "token_probabilities"]
