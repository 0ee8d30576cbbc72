"""One pre-norm decoder layer (mixer + feed-forward) and a block of them: the unit of the scan."""

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import LINEAR_ATTENTION, ModelConfig
from qnext_jax.model.attention import GatedAttention
from qnext_jax.model.deltanet import GatedDeltaNet
from qnext_jax.model.mlp import SwiGLU
from qnext_jax.model.moe import RouterStats, SparseMoE
from qnext_jax.model.norms import RMSNorm


class DecoderLayer(nnx.Module):
    """h + mixer(norm(h)), then h + ffn(norm(h)); the mixer is a Gated DeltaNet or gated
    attention, the feed-forward a sparse MoE or a dense SwiGLU."""

    def __init__(self, config: ModelConfig, mixer_type: str, use_moe: bool, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config)
        self.is_linear = mixer_type == LINEAR_ATTENTION
        self.use_moe = use_moe
        if self.is_linear:
            self.mixer = GatedDeltaNet(config, rngs=rngs)
        else:
            self.mixer = GatedAttention(config, rngs=rngs)
        if use_moe:
            self.mlp = SparseMoE(config, rngs=rngs)
        else:
            self.mlp = SwiGLU(config, config.intermediate_size, rngs=rngs)

    def __call__(self, h, *, rotary, segment_ids, valid):
        x = self.input_layernorm(h)
        if self.is_linear:
            h = h + self.mixer(x, segment_ids=segment_ids)
        else:
            h = h + self.mixer(x, rotary=rotary, segment_ids=segment_ids)
        return self.feed_forward(h, valid=valid)

    def feed_forward(self, h, *, valid):
        """The second half of the layer: h + ffn(norm(h)), and the MoE's RouterStats (or None)."""
        x = self.post_attention_layernorm(h)
        if self.use_moe:
            update, stats = self.mlp(x, valid=valid)
        else:
            update, stats = self.mlp(x), None
        return h + update.astype(h.dtype), stats


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer, recompute it in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_layer(layer: DecoderLayer, h, remat_policy: str, **inputs):
    """layer(h, **inputs), under activation checkpointing unless `remat_policy` is "none".

    Per layer, not per block: the backward pass then holds one layer's activations at a time
    (plus every layer's input, one [T, E] each) instead of a whole block's, which at long
    sequence lengths is the difference that matters."""
    if remat_policy == "none":
        return layer(h, **inputs)
    graph, state = nnx.split(layer)

    def forward(state, h):
        return nnx.merge(graph, state)(h, **inputs)

    return jax.checkpoint(forward, policy=_REMAT_POLICIES[remat_policy])(state, h)


class DecoderBlock(nnx.Module):
    """One period of the layer pattern (for the 80B model: 3 DeltaNet layers, 1 attention)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.remat_policy = config.remat_policy
        pattern = config.layer_pattern[: config.block_size]
        self.layers = nnx.List(
            [DecoderLayer(config, mixer, moe, rngs=rngs) for mixer, moe in pattern]
        )

    def __call__(self, h, *, rotary, segment_ids, valid):
        """Returns h and the RouterStats of this block's MoE layers stacked on axis 0 (or None)."""
        all_stats = []
        for layer in self.layers:
            h, stats = run_layer(layer, h, self.remat_policy, rotary=rotary,
                                 segment_ids=segment_ids, valid=valid)
            if stats is not None:
                all_stats.append(stats)
        return h, stack_stats(all_stats)


def stack_stats(stats: list[RouterStats]) -> RouterStats | None:
    if not stats:
        return None
    return RouterStats(*(jnp.stack(parts) for parts in zip(*stats)))
