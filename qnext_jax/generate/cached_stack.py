"""The main model and the MTP module run from their caches (the cached twin of
model/transformer.py: same modules, same parameters, new tokens only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import LINEAR_ATTENTION
from qnext_jax.generate.cache import StackCache
from qnext_jax.generate.cached_layers import layer_extend
from qnext_jax.model.params import compute_dtype
from qnext_jax.model.rope import rotary_tables


def _new_positions(cache: StackCache, new: int):
    return cache.length[:, None] + jnp.arange(new, dtype=jnp.int32)  # [B, T]


def main_extend(model, cache: StackCache, tokens, n_new, *, fresh: bool, per_position: bool):
    """tokens [B, T] at positions cache.length + t (the first n_new [B] of each row real) ->
    (hidden [B, T, E] after the final norm, pending extension per block layer)."""
    config = model.config
    rotary = rotary_tables(_new_positions(cache, tokens.shape[1]), config, compute_dtype(config))
    h = model.embed_tokens(tokens)
    graph, blocks = nnx.split(model.blocks)
    # Attention caches ride in the scan's carry and are written in place; the DeltaNet caches
    # (small) go in as per-block inputs and their pending extensions come out per block.
    attention = tuple(mixer != LINEAR_ATTENTION for mixer, _ in
                      config.layer_pattern[: config.block_size])
    carried = tuple(c for c, a in zip(cache.layers, attention) if a)
    scanned = tuple(c for c, a in zip(cache.layers, attention) if not a)

    def run_block(carry, inputs):
        h, carried = carry
        block_state, scanned, index = inputs
        block = nnx.merge(graph, block_state)
        # Queues in layer order: each layer takes its cache from the front; an attention layer
        # puts its updated cache at the back, so after the block `carried` is in order again.
        carried, scanned, pending = list(carried), list(scanned), []
        for layer, is_attention in zip(block.layers, attention):
            own = carried if is_attention else scanned
            h, extension = layer_extend(layer, h, own.pop(0), rotary=rotary, length=cache.length,
                                        n_new=n_new, fresh=fresh, per_position=per_position,
                                        block=index if is_attention else None)
            if is_attention:
                carried.append(extension)
            else:
                pending.append(extension)
        return (h, tuple(carried)), tuple(pending)

    indices = jnp.arange(config.num_blocks)
    # Looped unless asked to unroll (`layer_scan: unroll`; "auto" loops here too: on CPU the
    # loop is what the decode speed was measured with).
    (h, carried), scanned = jax.lax.scan(run_block, (h, carried), (blocks, scanned, indices),
                                         unroll=config.layer_scan == "unroll")
    carried, scanned = list(carried), list(scanned)
    pending = tuple(carried.pop(0) if a else scanned.pop(0) for a in attention)
    return model.final_norm(h), pending


def mtp_extend(model, cache: StackCache, previous, ahead_tokens, *, fresh: bool):
    """One MTP depth: previous [B, T, E] (the depth below's output at these positions) and
    ahead_tokens [B, T] (the token `depth` ahead of each) -> (output [B, T, E] after the MTP
    norm, pending extension per MTP layer)."""
    config = model.config
    rotary = rotary_tables(_new_positions(cache, previous.shape[1]), config, compute_dtype(config))
    h = model.mtp.fuse(previous, model.embed_tokens(ahead_tokens))
    pending = []
    for layer, layer_cache in zip(model.mtp.layers, cache.layers):
        h, extension = layer_extend(layer, h, layer_cache, rotary=rotary, length=cache.length,
                                    n_new=None, fresh=fresh, per_position=True)
        pending.append(extension)
    return model.mtp.norm(h), tuple(pending)
