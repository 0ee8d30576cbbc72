"""Multi-token prediction (spec section 8): fuse the normed embedding of the token k ahead with
the previous depth's hidden state, run full-attention decoder layers, normalise.

The module owns no embedding and no head: the caller passes the shared embeddings in and applies
the shared head to what comes out (no variables shared between modules).
"""

import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import FULL_ATTENTION, ModelConfig
from qnext_jax.model.decoder_layer import DecoderLayer, run_layer, stack_stats
from qnext_jax.model.norms import RMSNorm
from qnext_jax.model.params import cast, compute_dtype, normal_param
from qnext_jax.parallel.axes import constrain

RESIDUAL_AXES = ("batch", "sequence", "act_embed")  # as the main model's residual stream


class MultiTokenPredictor(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        hidden = config.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(hidden, config)
        self.pre_fc_norm_hidden = RMSNorm(hidden, config)
        # Input rows are [normed embedding | normed hidden] (this order, as vLLM and SGLang).
        self.fc = normal_param(rngs, (2 * hidden, hidden), config, ("fused", "embed"))  # (2E)E
        self.layers = nnx.List(
            [
                DecoderLayer(config, FULL_ATTENTION, config.mtp_uses_moe, rngs=rngs)
                for _ in range(config.mtp_num_hidden_layers)
            ]
        )
        self.norm = RMSNorm(hidden, config)

    def __call__(self, hidden, ahead_embeddings, *, rotary, segment_ids, valid):
        """hidden: [B, T, E] previous depth's output (depth 1: main model after its final norm);
        ahead_embeddings: [B, T, E] embeddings of the tokens k positions ahead.
        Returns (normed output [B, T, E], RouterStats of its MoE layers or None)."""
        # Pinned like the main residual stream: the fc weight's width is split over the axes
        # that also split the tokens, and unpinned, GSPMD may gather the tokens instead of the
        # weight (measured: the whole step's [B * T, 2E] fc gradient on every chip at 128K).
        ahead_embeddings = constrain(ahead_embeddings, RESIDUAL_AXES)
        h = constrain(self.fuse(hidden, ahead_embeddings), RESIDUAL_AXES)
        all_stats = []
        for layer in self.layers:
            h, stats = run_layer(layer, h, self.config.remat_policy, rotary=rotary,
                                 segment_ids=segment_ids, valid=valid)
            if stats is not None:
                all_stats.append(stats)
        return self.norm(h), stack_stats(all_stats)

    def fuse(self, hidden, ahead_embeddings):
        """[normed embedding | normed hidden] @ fc: the first layer's input [B, T, E]."""
        dtype = compute_dtype(self.config)
        fused = jnp.concatenate(
            [self.pre_fc_norm_embedding(ahead_embeddings), self.pre_fc_norm_hidden(hidden)], axis=-1
        ).astype(dtype)
        fused = constrain(fused, RESIDUAL_AXES)
        return jnp.einsum("BTC,CE->BTE", fused, cast(self.fc, dtype))  # [B, T, E]
