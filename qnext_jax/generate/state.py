"""What a generation carries from one jitted step to the next (a pytree, donated each step)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp


class DecodeState(NamedTuple):
    main: object  # StackCache of the main model; its length is n_tokens - 1 (the last token is
    #               sampled but not yet run through the model)
    mtp: tuple  # StackCache per MTP depth (speculative decoding), else ()
    tokens: jnp.ndarray  # [B, L] int32: prompt then generated tokens, n_tokens of them valid
    n_tokens: jnp.ndarray  # [B] int32
    prompt_length: jnp.ndarray  # [B] int32
    done: jnp.ndarray  # [B] bool: a stop token or max_new_tokens reached; the row is frozen
    key: jnp.ndarray  # PRNG key, split once per step
    drafts: jnp.ndarray  # [B, D] int32: the MTP drafts of the next D tokens after the last one
    draft_probs: jnp.ndarray  # [B, D, V] fp32, the distributions they were sampled from
    #                           ([B, D, 0] when greedy: no rejection rule to feed)
    rings: tuple  # per depth 0..D-1: [B, R, E], its recent outputs by position modulo R
    accepted: jnp.ndarray  # [D] int32: drafts of depth k accepted, summed over rows and rounds
    offered: jnp.ndarray  # [D] int32: rounds in which depth k's draft was reached
    rounds: jnp.ndarray  # [] int32: verification rounds, summed over the rows still running


def finished(done, new_tokens, n_new, generated, stop_tokens: tuple[int, ...], max_new: int):
    """Rows done after n_new [B] of new_tokens [B, T] were appended, with `generated` [B]
    tokens generated in all: a stop token among them, or max_new reached."""
    if stop_tokens:
        real = jnp.arange(new_tokens.shape[1])[None, :] < n_new[:, None]
        is_stop = jnp.isin(new_tokens, jnp.asarray(stop_tokens, jnp.int32)) & real
        done = done | jnp.any(is_stop, axis=1)
    return done | (generated >= max_new)


def write_tokens(buffer, new_tokens, start):
    """buffer [B, L] with new_tokens [B, T] written at start [B] of each row."""
    index = start[:, None] + jnp.arange(new_tokens.shape[1])
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, index].set(new_tokens, mode="drop")
