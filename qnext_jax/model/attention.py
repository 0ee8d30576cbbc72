"""Gated full attention (spec section 3): GQA, zero-centred q/k norms, partial RoPE, causal and
segment-aware softmax attention, and an element-wise sigmoid output gate before o_proj."""

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import ModelConfig
from qnext_jax.model.norms import RMSNorm
from qnext_jax.model.params import cast, compute_dtype, normal_param
from qnext_jax.model.rope import apply_rotary
from qnext_jax.ops.segments import document_index


class GatedAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        hidden, heads, kv_heads, head_dim = (
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        # HF interleaves [query_h | gate_h] per head inside q_proj; we keep them apart so both
        # shard by heads. Kernels are named by axis order: E embed, N q heads, K kv heads, D dim.
        self.q_proj = normal_param(rngs, (hidden, heads, head_dim), config, ("embed", "heads", "head_dim"))  # END
        self.gate_proj = normal_param(rngs, (hidden, heads, head_dim), config, ("embed", "heads", "head_dim"))  # END
        self.k_proj = normal_param(rngs, (hidden, kv_heads, head_dim), config, ("embed", "kv_heads", "head_dim"))  # EKD
        self.v_proj = normal_param(rngs, (hidden, kv_heads, head_dim), config, ("embed", "kv_heads", "head_dim"))  # EKD
        self.o_proj = normal_param(rngs, (heads, head_dim, hidden), config, ("heads", "head_dim", "embed"))  # NDE
        self.q_norm = RMSNorm(head_dim, config)
        self.k_norm = RMSNorm(head_dim, config)

    def __call__(self, x, *, rotary, segment_ids):
        """x: [B, T, E]; rotary: (cos, sin) [B, T, rotary_dim]; segment_ids: [B, T] or None."""
        dtype = compute_dtype(self.config)
        x = x.astype(dtype)
        query = jnp.einsum("BTE,END->BTND", x, cast(self.q_proj, dtype))  # [B, T, N, D]
        gate = jnp.einsum("BTE,END->BTND", x, cast(self.gate_proj, dtype))  # [B, T, N, D]
        key = jnp.einsum("BTE,EKD->BTKD", x, cast(self.k_proj, dtype))  # [B, T, K, D]
        value = jnp.einsum("BTE,EKD->BTKD", x, cast(self.v_proj, dtype))  # [B, T, K, D]
        cos, sin = rotary
        query = apply_rotary(self.q_norm(query), cos, sin)
        key = apply_rotary(self.k_norm(key), cos, sin)

        mask = None
        if segment_ids is not None:
            # Documents as the conv and the delta rule see them (a new one wherever the id
            # changes), not raw ids: a row may reuse an id for a later, separate document.
            documents = document_index(segment_ids)
            same_document = documents[:, :, None] == documents[:, None, :]  # [B, T, S]
            mask = same_document[:, None]  # [B, 1, T, S]
        # GQA inside: query head n reads kv head n // (N / K), HF's repeat_kv grouping.
        out = jax.nn.dot_product_attention(
            query, key, value, mask=mask, is_causal=True, scale=self.config.head_dim ** -0.5
        )  # [B, T, N, D]
        out = out * jax.nn.sigmoid(gate)
        return jnp.einsum("BTND,NDE->BTE", out, cast(self.o_proj, dtype))  # [B, T, E]
