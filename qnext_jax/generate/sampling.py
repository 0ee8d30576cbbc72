"""Turning logits into tokens: greedy, temperature, top-k, top-p (nucleus), from a seed.

`token_probabilities` is the distribution a sampler draws from; speculative decoding needs it
for both the drafts and the target, so that its rejection rule reproduces this sampler exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class SamplingSettings:
    """temperature 0 is greedy (top_k and top_p then do nothing); top_k 0 and top_p 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def token_probabilities(logits: jnp.ndarray, settings: SamplingSettings) -> jnp.ndarray:
    """logits [..., V] -> the fp32 distribution sampled from: logits / temperature, restricted
    to the top_k most likely tokens and then to the smallest set whose probability reaches
    top_p (the most likely token always stays), renormalised. Greedy: one-hot at the argmax."""
    logits = logits.astype(jnp.float32)
    if settings.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    logits = logits / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, settings.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    if settings.top_p < 1.0:
        order = jnp.argsort(-probs, axis=-1)
        sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass ranked above each token
        keep_sorted = before < settings.top_p  # includes the first token that crosses top_p
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        probs = jnp.where(keep, probs, 0.0)
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    return probs


def sample_from(probs: jnp.ndarray, key) -> jnp.ndarray:
    """One token per row of probs [..., V] (int32)."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def sample(logits: jnp.ndarray, settings: SamplingSettings, key) -> jnp.ndarray:
    if settings.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_from(token_probabilities(logits, settings), key)
