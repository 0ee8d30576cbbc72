"""Prefill and plain decoding, one token per row per step (jitted by generate/generator.py).

Prefill runs a batch of right-padded prompts of different lengths through the training path
(chunked / Pallas delta rule, the training attention op) in one call and samples each row's
first token from the logits at its own last prompt token; a decode step runs one token per
row through the recurrence and the KV cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qnext_jax.generate.cache import commit
from qnext_jax.generate.cached_stack import main_extend
from qnext_jax.generate.sampling import SamplingSettings, sample
from qnext_jax.generate.state import DecodeState, finished, write_tokens


def at_positions(x, index):
    """x [B, T, ...] at index [B] (one position per row) -> [B, ...]."""
    index = jnp.clip(index, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, index.reshape(-1, 1, *(1,) * (x.ndim - 2)), axis=1)[:, 0]


def prefill(model, state: DecodeState, prompts, *, settings: SamplingSettings,
            stop_tokens: tuple[int, ...], max_new: int):
    """prompts [B, P] right-padded; state.prompt_length [B] their lengths; caches empty.
    Returns (state with each row's first generated token, hidden [B, P, E] of the prompts)."""
    lengths = state.prompt_length
    hidden, pending = main_extend(model, state.main, prompts, lengths, fresh=True,
                                  per_position=False)
    main = commit(state.main, pending, lengths, stacked=True)
    key, subkey = jax.random.split(state.key)
    first = sample(model.head(at_positions(hidden, lengths - 1)[:, None])[:, 0], settings, subkey)
    tokens = write_tokens(state.tokens, prompts, jnp.zeros_like(lengths))
    tokens = write_tokens(tokens, first[:, None], lengths)
    done = finished(state.done, first[:, None], jnp.ones_like(lengths), jnp.ones_like(lengths),
                    stop_tokens, max_new)
    return state._replace(main=main, tokens=tokens, n_tokens=lengths + 1, done=done, key=key), hidden


def decode_step(model, state: DecodeState, *, settings: SamplingSettings,
                stop_tokens: tuple[int, ...], max_new: int) -> DecodeState:
    """Runs each row's last token and appends the next; rows already done stay as they are."""
    last = at_positions(state.tokens, state.n_tokens - 1)
    ones = jnp.ones_like(last)
    hidden, pending = main_extend(model, state.main, last[:, None], ones, fresh=False,
                                  per_position=True)
    key, subkey = jax.random.split(state.key)
    following = sample(model.head(hidden)[:, 0], settings, subkey)
    keep = jnp.where(state.done, 0, 1)
    main = commit(state.main, pending, keep, stacked=True)
    tokens = write_tokens(state.tokens, jnp.where(state.done, 0, following)[:, None],
                          jnp.where(state.done, state.tokens.shape[1], state.n_tokens))
    n_tokens = state.n_tokens + keep
    done = finished(state.done, following[:, None], keep, n_tokens - state.prompt_length,
                    stop_tokens, max_new)
    return state._replace(main=main, tokens=tokens, n_tokens=n_tokens, done=done, key=key)
