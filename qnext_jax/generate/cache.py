"""Decoding caches: what each layer keeps between calls, and how a call's results are kept.

A full-attention layer keeps its keys (normed and rotated) and values, preallocated to the
generation's maximum length; a DeltaNet layer keeps the last `conv width - 1` inputs of its
short conv and its recurrent state S in fp32. A stack (the main model, or one MTP depth) adds
how many tokens each row has cached.

Every call that extends a cache (prefill, decode, speculative verification) first returns a
*pending* extension and is then committed with how many of its new tokens each row keeps, so
rejected drafts leave no trace: keys past a row's length are never read (the length is the
truncation), and a DeltaNet layer keeps its state after every new token plus its inputs, from
which the state and window after any accepted prefix are picked.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from qnext_jax.config import LINEAR_ATTENTION, ModelConfig
from qnext_jax.model.params import compute_dtype


class AttentionCache(NamedTuple):
    """Head-major, so that the per-head products over the cache read it as it lies (a
    [B, L, K, D] cache was transposed, i.e. copied whole, by every decode step)."""

    key: jnp.ndarray  # [B, K, L, D] compute dtype, after k_norm and RoPE
    value: jnp.ndarray  # [B, K, L, D]


class DeltaNetCache(NamedTuple):
    conv_q: jnp.ndarray  # [B, W-1, Hk, dk] the last W-1 inputs of the short conv (pre-conv)
    conv_k: jnp.ndarray  # [B, W-1, Hk, dk]
    conv_v: jnp.ndarray  # [B, W-1, Hv, dv]
    state: jnp.ndarray  # [B, Hv, dk, dv] fp32, the state after the row's last cached token


class DeltaNetPending(NamedTuple):
    """A DeltaNet layer's extension by T tokens, not yet committed."""

    conv_q: jnp.ndarray  # [B, W-1+T, Hk, dk] the old window followed by the new inputs
    conv_k: jnp.ndarray
    conv_v: jnp.ndarray
    states: jnp.ndarray  # [B, T+1, Hv, dk, dv]: after 0..T new tokens; or [B, 1, ...] when only
    #                      the state after each row's valid new tokens was computed (prefill)


class StackCache(NamedTuple):
    """The caches of one decoder stack. Main model: one entry per layer of a block, each
    stacked over the blocks on axis 0 (the scan's layout); an MTP depth: one per MTP layer."""

    layers: tuple
    length: jnp.ndarray  # [B] int32: tokens cached per row (the next token's position)


def attention_cache(config: ModelConfig, batch: int, max_length: int, lead=()) -> AttentionCache:
    shape = (*lead, batch, config.num_key_value_heads, max_length, config.head_dim)
    zeros = jnp.zeros(shape, compute_dtype(config))
    return AttentionCache(zeros, zeros)


def deltanet_cache(config: ModelConfig, batch: int, lead=()) -> DeltaNetCache:
    dtype, width = compute_dtype(config), config.linear_conv_kernel_dim - 1
    key_heads, value_heads = config.linear_num_key_heads, config.linear_num_value_heads
    key_dim, value_dim = config.linear_key_head_dim, config.linear_value_head_dim
    return DeltaNetCache(
        jnp.zeros((*lead, batch, width, key_heads, key_dim), dtype),
        jnp.zeros((*lead, batch, width, key_heads, key_dim), dtype),
        jnp.zeros((*lead, batch, width, value_heads, value_dim), dtype),
        jnp.zeros((*lead, batch, value_heads, key_dim, value_dim), jnp.float32),
    )


def main_cache(config: ModelConfig, batch: int, max_length: int) -> StackCache:
    lead = (config.num_blocks,)
    layers = tuple(
        deltanet_cache(config, batch, lead) if mixer == LINEAR_ATTENTION
        else attention_cache(config, batch, max_length, lead)
        for mixer, _ in config.layer_pattern[: config.block_size]
    )
    return StackCache(layers, jnp.zeros((batch,), jnp.int32))


def mtp_caches(config: ModelConfig, batch: int, max_length: int, depth: int) -> tuple[StackCache, ...]:
    """One cache per MTP depth: depth k attends over its own stream of inputs (as trained)."""
    return tuple(
        StackCache(tuple(attention_cache(config, batch, max_length)
                         for _ in range(config.mtp_num_hidden_layers)),
                   jnp.zeros((batch,), jnp.int32))
        for _ in range(depth)
    )


def commit_layer(old, pending, keep: jnp.ndarray):
    """The layer cache after keeping `keep` [B] of the pending new tokens of each row (`old`:
    the layer's cache before the extension, which fixes the conv window's width)."""
    if isinstance(pending, AttentionCache):
        return pending  # entries past the row's length are never read: the length truncates
    width = old.conv_q.shape[1]
    index = keep[:, None] + jnp.arange(width)  # [B, W-1]: inputs keep .. keep+W-2 of the row
    windows = [jnp.take_along_axis(window, index[:, :, None, None], axis=1)
               for window in pending[:3]]
    if pending.states.shape[1] == 1:
        state = pending.states[:, 0]
    else:
        state = jnp.take_along_axis(pending.states, keep[:, None, None, None, None], axis=1)[:, 0]
    return DeltaNetCache(*windows, state)


def commit(cache: StackCache, pending: tuple, keep: jnp.ndarray, *, stacked: bool) -> StackCache:
    """Keep `keep` [B] new tokens per row of a stack's pending extension; `stacked` for the
    main model's caches, which carry the blocks on axis 0."""
    commit_one = jax.vmap(commit_layer, in_axes=(0, 0, None)) if stacked else commit_layer
    layers = tuple(commit_one(old, new, keep) for old, new in zip(cache.layers, pending))
    return StackCache(layers, cache.length + keep.astype(jnp.int32))
