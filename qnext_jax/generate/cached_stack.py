"""The main model and the MTP module run from their caches (the cached twin of
model/transformer.py: same modules, same parameters, new tokens only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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

    def run_block(h, inputs):
        block_state, layer_caches = inputs
        block = nnx.merge(graph, block_state)
        pending = []
        for layer, layer_cache in zip(block.layers, layer_caches):
            h, extension = layer_extend(layer, h, layer_cache, rotary=rotary, length=cache.length,
                                        n_new=n_new, fresh=fresh, per_position=per_position)
            pending.append(extension)
        return h, tuple(pending)

    h, pending = jax.lax.scan(run_block, h, (blocks, cache.layers))
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
