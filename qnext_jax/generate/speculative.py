"""MTP self-speculative decoding: the MTP module drafts D tokens, the main model verifies them
in one forward from its caches, and the longest accepted prefix plus one token is kept.

Drafting is the training computation, recursively: depth d at position i reads the depth d-1
output at i (the main model's final hidden state for d = 1) and the embedding of token i+d,
and predicts token i+d+1. Each depth keeps its own KV cache over its own input stream, holding
the positions whose inputs are all accepted tokens: depth d commits position i once token i+d
is known. The positions after that (at most d-1 of them, fed earlier drafts) are recomputed
every round. A depth's recent outputs stay in a ring buffer indexed by position modulo R, from
which the next depth (and the next round) reads its inputs.

Acceptance: greedy keeps drafts equal to the main model's argmax; sampling uses the standard
rejection rule (accept draft x with probability min(1, p(x)/q(x)), otherwise draw from
normalise(max(0, p - q))), so the tokens are distributed exactly as plain sampling's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qnext_jax.generate.cache import commit
from qnext_jax.generate.cached_stack import main_extend, mtp_extend
from qnext_jax.generate.decoding import at_positions
from qnext_jax.generate.sampling import SamplingSettings, sample_from, token_probabilities
from qnext_jax.generate.state import DecodeState, finished, write_tokens


def ring_size(depth: int) -> int:
    # Depth d reads its inputs at positions c_d .. last: at most 2D+1 of them.
    return 2 * depth + 2


def write_ring(ring, outputs, first, count):
    """ring [B, R, E] updated with outputs [B, T, E] of positions first .. first+count-1 [B]
    (each slot takes the newest of those positions that map to it)."""
    size = ring.shape[1]
    last = first + count - 1
    slots = jnp.arange(size)[None, :]
    positions = last[:, None] - jnp.mod(last[:, None] - slots, size)  # [B, R]
    fresh = positions >= first[:, None]
    values = at_positions_many(outputs, positions - first[:, None])
    return jnp.where(fresh[..., None], values, ring)


def read_ring(ring, positions):
    """ring [B, R, E] at positions [B, T] -> [B, T, E]."""
    return at_positions_many(ring, jnp.mod(positions, ring.shape[1]))


def at_positions_many(x, index):
    """x [B, T, ...] at index [B, S] -> [B, S, ...] (indices clipped into range)."""
    index = jnp.clip(index, 0, x.shape[1] - 1)
    return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


def draft(model, state: DecodeState, settings: SamplingSettings, key, *, depth: int,
          prefill_hidden=None) -> DecodeState:
    """Brings every MTP depth's cache up to the accepted tokens and drafts the next `depth`
    tokens after the last one. prefill_hidden [B, P, E]: right after prefill, the prompts'
    final hidden states (the depths then run over whole prompts, their caches empty)."""
    n_tokens = state.n_tokens
    last = n_tokens - 2  # the main model's last cached position: it predicted the last token
    caches, rings, drafts, probs = list(state.mtp), list(state.rings), [], []
    previous = prefill_hidden
    for d in range(1, depth + 1):
        cache = caches[d - 1]
        first = cache.length
        if prefill_hidden is not None:
            width = prefill_hidden.shape[1]
        else:
            width = 2 * depth  # at most j + d <= 2D positions per round
            previous = read_ring(rings[d - 1], first[:, None] + jnp.arange(width))
        positions = first[:, None] + jnp.arange(width)  # [B, width]
        count = last - first + 1
        # Token i+d: accepted if i+d < n_tokens, otherwise this round's draft of depth i+d-n.
        ahead = positions + d
        accepted_token = at_positions_many(state.tokens, ahead)
        drafted = at_positions_many(jnp.stack(drafts, axis=1) if drafts else
                                    jnp.zeros_like(accepted_token[:, :1]), ahead - n_tokens[:, None])
        ahead_tokens = jnp.where(ahead < n_tokens[:, None], accepted_token, drafted)
        out, pending = mtp_extend(model, cache, previous, ahead_tokens,
                                  fresh=prefill_hidden is not None)
        key, subkey = jax.random.split(key)
        logits = model.head(at_positions(out, count - 1)[:, None])[:, 0]
        if settings.greedy:
            drafts.append(jnp.argmax(logits, axis=-1).astype(jnp.int32))
        else:
            q = token_probabilities(logits, settings)
            drafts.append(sample_from(q, subkey))
            probs.append(q)
        keep = jnp.clip(n_tokens - d - first, 0, jnp.maximum(count, 0))
        caches[d - 1] = commit(cache, pending, keep, stacked=False)
        if d < depth:
            rings[d] = write_ring(rings[d], out, first, count)
        previous = out
    draft_probs = (jnp.stack(probs, axis=1) if probs
                   else jnp.zeros((*state.drafts.shape, 0), jnp.float32))
    return state._replace(mtp=tuple(caches), rings=tuple(rings),
                          drafts=jnp.stack(drafts, axis=1), draft_probs=draft_probs)


def prefill_drafts(model, state: DecodeState, prompt_hidden, *, settings: SamplingSettings,
                   depth: int) -> DecodeState:
    """After prefill: the main ring gets the prompts' hidden states, the depths their drafts."""
    zeros = jnp.zeros_like(state.prompt_length)
    rings = (write_ring(state.rings[0], prompt_hidden, zeros, state.prompt_length),
             *state.rings[1:])
    key, subkey = jax.random.split(state.key)
    state = state._replace(rings=rings, key=key)
    return draft(model, state, settings, subkey, depth=depth, prefill_hidden=prompt_hidden)


def accept(logits, drafts, draft_probs, settings: SamplingSettings, key):
    """logits [B, D+1, V] of the main model at the last token and the D drafts.
    Returns (accepted drafts j [B], new tokens [B, D+1]: the drafts with token j replaced by
    the main model's own choice there, of which the first j+1 are kept)."""
    depth = drafts.shape[1]
    if settings.greedy:
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, D+1]
        matches = drafts == target[:, :depth]
        accepted = jnp.sum(jnp.cumprod(matches, axis=1), axis=1)
        chosen = at_positions(target, accepted)
    else:
        p = token_probabilities(logits, settings)  # [B, D+1, V]
        accept_key, choose_key = jax.random.split(key)
        p_draft = jnp.take_along_axis(p[:, :depth], drafts[..., None], axis=-1)[..., 0]
        q_draft = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
        uniform = jax.random.uniform(accept_key, drafts.shape)
        accepted = jnp.sum(jnp.cumprod(uniform * q_draft < p_draft, axis=1), axis=1)
        q_padded = jnp.concatenate([draft_probs, jnp.zeros_like(p[:, :1])], axis=1)
        p_j, q_j = at_positions(p, accepted), at_positions(q_padded, accepted)
        residual = jnp.maximum(p_j - q_j, 0.0)
        total = jnp.sum(residual, axis=-1, keepdims=True)
        # All drafts accepted: q_j is zero and this is p itself; p == q leaves nothing to reject.
        choose_from = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), p_j)
        chosen = sample_from(choose_from, choose_key)
    index = jnp.arange(depth + 1)[None, :]
    drafts_padded = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], axis=1)
    new_tokens = jnp.where(index == accepted[:, None], chosen[:, None], drafts_padded)
    return accepted.astype(jnp.int32), new_tokens


def speculative_round(model, state: DecodeState, *, settings: SamplingSettings, depth: int,
                      stop_tokens: tuple[int, ...], max_new: int) -> DecodeState:
    """Verify the drafts, keep the accepted prefix and one more token, draft again."""
    main_length = state.main.length
    last = at_positions(state.tokens, state.n_tokens - 1)
    verify = jnp.concatenate([last[:, None], state.drafts], axis=1)  # [B, D+1]
    hidden, pending = main_extend(model, state.main, verify, jnp.full_like(last, depth + 1),
                                  fresh=False, per_position=True)
    key, accept_key, draft_key = jax.random.split(state.key, 3)
    accepted, new_tokens = accept(model.head(hidden), state.drafts, state.draft_probs, settings,
                                  accept_key)
    running = ~state.done
    keep = jnp.where(running, accepted + 1, 0)
    main = commit(state.main, pending, keep, stacked=True)
    rings = (write_ring(state.rings[0], hidden, main_length, jnp.full_like(last, depth + 1)),
             *state.rings[1:])
    tokens = write_tokens(state.tokens, new_tokens,
                          jnp.where(running, state.n_tokens, state.tokens.shape[1]))
    n_tokens = state.n_tokens + keep
    done = finished(state.done, new_tokens, keep, n_tokens - state.prompt_length, stop_tokens,
                    max_new)
    reached = running[:, None] & (accepted[:, None] >= jnp.arange(depth)[None, :])
    taken = running[:, None] & (accepted[:, None] > jnp.arange(depth)[None, :])
    state = state._replace(
        main=main, rings=rings, tokens=tokens, n_tokens=n_tokens, done=done, key=key,
        offered=state.offered + jnp.sum(reached, axis=0).astype(jnp.int32),
        accepted=state.accepted + jnp.sum(taken, axis=0).astype(jnp.int32),
        rounds=state.rounds + jnp.sum(running).astype(jnp.int32))
    return draft(model, state, settings, draft_key, depth=depth)
