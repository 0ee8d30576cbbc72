"""Decoder layers run from a cache: T new tokens per row at positions `length .. length+T-1`.

Two ways to run the DeltaNet's delta rule, chosen by the caller:
  per_position=False (prefill): the chunked / Pallas rule from the cached state, as in training;
      tokens past a row's `n_new` get g = 0 and beta = 0, which leaves the state unchanged, so the
      final state is the state after the row's own last token;
  per_position=True (decode, verification, drafting): the recurrence, one token at a time,
      keeping the state after every new token so that any accepted prefix can be committed.
Attention reads the cache (keys at positions <= the query's); `fresh=True` says the cache is
empty, and the new tokens then attend among themselves through the training attention op
(never a [T, L] score matrix for a long prompt).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qnext_jax.generate.cache import AttentionCache, DeltaNetCache, DeltaNetPending
from qnext_jax.ops import gated_delta_rule
from qnext_jax.ops.causal_conv import causal_depthwise_conv
from qnext_jax.ops.chunked_delta.chunk_math import l2_normalize
from qnext_jax.ops.delta_rule_reference import delta_rule_step
from qnext_jax.parallel.axes import constrain, under_mesh
from qnext_jax.parallel.mesh import axis_size


def layer_extend(layer, h, cache, *, rotary, length, n_new, fresh: bool, per_position: bool,
                 block=None):
    """One decoder layer on h [B, T, E] from its cache -> (h, pending cache extension).
    block: for an attention cache stacked over the blocks, this layer's block index."""
    x = layer.input_layernorm(h)
    if layer.is_linear:
        update, pending = deltanet_extend(layer.mixer, x, cache, n_new=n_new,
                                          per_position=per_position)
    else:
        update, pending = attention_extend(layer.mixer, x, cache, rotary=rotary, length=length,
                                           fresh=fresh, block=block)
    h, _ = layer.feed_forward(h + update, valid=None)
    return h, pending


def deltanet_extend(mixer, x, cache: DeltaNetCache, *, n_new, per_position: bool):
    query, key, value, z, g, beta = mixer.project(x)
    width = cache.conv_q.shape[1]
    windows = [jnp.concatenate([old, new.astype(old.dtype)], axis=1)
               for old, new in zip(cache[:3], (query, key, value))]
    # The conv over [window | new] from a zero history; its first W-1 outputs belong to tokens
    # already cached, the rest are the new tokens' (the same arithmetic as the whole sequence).
    query, key, value = (jax.nn.silu(causal_depthwise_conv(w, kernel))[:, width:]
                         for w, kernel in zip(windows, mixer.conv_weights()))
    if per_position:
        out, states = recurrence_with_states(query, key, value, g, beta, cache.state)
    else:
        valid = jnp.arange(x.shape[1])[None, :] < n_new[:, None]  # [B, T]
        g = jnp.where(valid[..., None], g, 0.0)
        beta = jnp.where(valid[..., None], beta, jnp.zeros_like(beta))
        out, final = gated_delta_rule(query, key, value, g, beta, initial_state=cache.state,
                                      impl=mixer.config.delta_rule_impl, normalize_qk=True)
        states = final[:, None]
    return mixer.finish(out, z), DeltaNetPending(*windows, states)


def recurrence_with_states(q, k, v, g, beta, state):
    """The gated delta rule token by token from `state` [B, Hv, dk, dv]; q, k [B, T, Hk, dk]
    before the L2 norm. Returns (o [B, T, Hv, dv] in v's dtype, states [B, T+1, Hv, dk, dv])."""
    group = v.shape[2] // q.shape[2]
    q = jnp.repeat(l2_normalize(q, q.shape[-1] ** -0.5), group, axis=2)
    k = jnp.repeat(l2_normalize(k), group, axis=2)
    f32 = lambda x: x.astype(jnp.float32)

    def step(state, inputs):
        state, out = delta_rule_step(state, *inputs)
        return state, (state, out)

    time_major = [jnp.moveaxis(f32(x), 1, 0) for x in (q, k, v, g, beta)]
    # Unrolled: T is a handful of tokens (decode, verification, drafting), and a loop of a few
    # iterations costs more in loop overhead than in work on CPU.
    _, (states, out) = jax.lax.scan(step, state, time_major, unroll=True)
    states = jnp.concatenate([state[:, None], jnp.moveaxis(states, 0, 1)], axis=1)
    return jnp.moveaxis(out, 0, 1).astype(v.dtype), states


def attention_extend(mixer, x, cache: AttentionCache, *, rotary, length, fresh: bool,
                     block=None):
    """The new keys and values are written into the cache in place (into block `block` of a
    cache stacked over the blocks: the scan carries it, so no step copies a whole cache)."""
    query, key, value, gate = mixer.project(x, rotary)
    batch, new, kv_heads = key.shape[:3]
    rows = jnp.arange(batch)[:, None, None]
    heads = jnp.arange(kv_heads)[None, :, None]
    positions = (length[:, None] + jnp.arange(new))[:, None, :]  # [B, 1, T]
    at = (rows, heads, positions) if block is None else (block, rows, heads, positions)
    head_major = lambda x, like: jnp.swapaxes(x, 1, 2).astype(like.dtype)  # [B, K, T, D]
    cache = AttentionCache(cache.key.at[at].set(head_major(key, cache.key), mode="drop"),
                           cache.value.at[at].set(head_major(value, cache.value), mode="drop"))
    if fresh:
        out = mixer.attend(query, key, value, None)
    else:
        own = cache if block is None else AttentionCache(cache.key[block], cache.value[block])
        out = attend_to_cache(query, own, length, mixer.config.head_dim ** -0.5)
    return mixer.finish(out, gate), cache


def attend_to_cache(query, cache: AttentionCache, length, scale: float):
    """query [B, T, N, D] at positions length + t attends to the cached keys at positions
    <= its own (the new tokens' keys already written). Softmax in fp32, its weights rounded to
    the cache's dtype for the product with the values (as transformers' attention does), which
    reads the cache as it lies: no per-step copy of it. GQA: query head n reads kv head
    n // (N / K)."""
    batch, new, heads, dim = query.shape
    kv_heads, max_length = cache.key.shape[1], cache.key.shape[2]
    query = _groups_over_tensor(query.reshape(batch, new, kv_heads, heads // kv_heads, dim))
    scores = jnp.einsum("BTKGD,BKLD->BKGTL", query, cache.key,
                        preferred_element_type=jnp.float32) * scale
    positions = length[:, None] + jnp.arange(new)  # [B, T]
    visible = jnp.arange(max_length)[None, None, :] <= positions[:, :, None]  # [B, T, L]
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("BKGTL,BKLD->BTKGD", weights.astype(cache.value.dtype), cache.value,
                     preferred_element_type=jnp.float32)
    return out.reshape(batch, new, heads, dim).astype(cache.value.dtype)


def _groups_over_tensor(query):
    """query [B, T, K, G, D]. With fewer kv heads than tensor ranks the cache is replicated
    over `tensor` (the sharding table): the query heads of each kv head are split over it
    instead (an all-to-all of one step's queries), so every device reads the cache as it lies.
    Left to itself the partitioner splits K x G, and each step slices a copy of every device's
    kv head out of the cache (192 MiB a step for the 80B at 32K tokens on 4 ranks) and
    gathers the caches back."""
    if not under_mesh():
        return query
    tensor = axis_size(jax.sharding.get_abstract_mesh(), "tensor")
    kv_heads, group = query.shape[2], query.shape[3]
    if tensor == 1 or kv_heads % tensor == 0 or group % tensor:
        return query
    return constrain(query, ("batch", None, None, "heads", None))
