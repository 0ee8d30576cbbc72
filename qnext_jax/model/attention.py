"""Gated full attention (spec section 3): GQA, zero-centred q/k norms, partial RoPE, causal and
document-masked softmax attention, and an element-wise sigmoid output gate before o_proj.

The softmax attention never forms a [T, T] matrix (ops/causal_attention: blockwise, or the
splash kernel on TPU); under a mesh it runs per device with the sequence split over `sequence`
(parallel/context_parallel)."""

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import ModelConfig
from qnext_jax.model.norms import RMSNorm
from qnext_jax.model.params import cast, compute_dtype, normal_param
from qnext_jax.model.projections import project_together
from qnext_jax.model.rope import apply_rotary
from qnext_jax.ops.causal_attention import causal_attention
from qnext_jax.ops.segments import document_index
from qnext_jax.parallel.axes import shard_map_logical, under_mesh
from qnext_jax.parallel.context_parallel import attention_across_shards
from qnext_jax.parallel.mesh import axis_size


class GatedAttention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        hidden, heads, kv_heads, head_dim = (
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        # HF interleaves [query_h | gate_h] per head inside q_proj; we keep them apart so both
        # shard by heads. Kernels are named by axis order: E embed, N q heads, K kv heads, D dim.
        self.q_proj = normal_param(rngs, (hidden, heads, head_dim), config, ("embed", "heads", "head_dim"))  # END
        if config.attention_output_gate:
            self.gate_proj = normal_param(rngs, (hidden, heads, head_dim), config, ("embed", "heads", "head_dim"))  # END
        self.k_proj = normal_param(rngs, (hidden, kv_heads, head_dim), config, ("embed", "kv_heads", "head_dim"))  # EKD
        self.v_proj = normal_param(rngs, (hidden, kv_heads, head_dim), config, ("embed", "kv_heads", "head_dim"))  # EKD
        self.o_proj = normal_param(rngs, (heads, head_dim, hidden), config, ("heads", "head_dim", "embed"))  # NDE
        self.q_norm = RMSNorm(head_dim, config)
        self.k_norm = RMSNorm(head_dim, config)

    def __call__(self, x, *, rotary, segment_ids):
        """x: [B, T, E]; rotary: (cos, sin) [B, T, rotary_dim]; segment_ids: [B, T] or None."""
        query, key, value, gate = self.project(x, rotary)
        documents = None if segment_ids is None else document_index(segment_ids)
        return self.finish(self.attend(query, key, value, documents), gate)

    def project(self, x, rotary):
        """x [B, T, E] -> query, gate [B, T, N, D] and key, value [B, T, K, D], the query and
        key normed and rotated (what a KV cache holds). The gate is None without the output gate."""
        dtype = compute_dtype(self.config)
        gated = self.config.attention_output_gate
        kernels = (self.q_proj, self.gate_proj) if gated else (self.q_proj,)
        projected = project_together(
            x.astype(dtype), [cast(kernel, dtype) for kernel in (*kernels, self.k_proj, self.v_proj)])
        query, gate, key, value = projected if gated else (projected[0], None, *projected[1:])
        cos, sin = rotary
        query = apply_rotary(self.q_norm(query), cos, sin)
        key = apply_rotary(self.k_norm(key), cos, sin)
        return query, key, value, gate

    def attend(self, query, key, value, documents):
        """Causal (and document-masked) attention of the queries to keys of the same tokens."""
        scale = self.config.head_dim ** -0.5
        if self.config.attention_impl == "xla":
            return _xla_attention(query, key, value, documents, scale)
        if under_mesh():
            return _attention_on_mesh(query, key, value, documents, scale, self.config.attention_impl,
                                      self.config.context_parallel_attention == "zigzag")
        return causal_attention(query, key, value, documents, documents, scale=scale,
                                impl=self.config.attention_impl)

    def finish(self, out, gate):
        """Output gate (unless switched off), then o_proj: [B, T, N, D] -> [B, T, E]."""
        if gate is not None:
            out = out * jax.nn.sigmoid(gate)
        return jnp.einsum("BTND,NDE->BTE", out, cast(self.o_proj, compute_dtype(self.config)))


def _xla_attention(query, key, value, documents, scale):
    """The reference: XLA's attention with a [B, 1, T, T] mask of same-document pairs (documents
    as the conv and the delta rule see them, not raw ids, which a row may reuse)."""
    mask = None
    if documents is not None:
        mask = (documents[:, :, None] == documents[:, None, :])[:, None]
    # GQA inside: query head n reads kv head n // (N / K), HF's repeat_kv grouping.
    return jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=True, scale=scale)


def _attention_on_mesh(query, key, value, documents, scale, impl, zigzag):
    """Each device attends its rows, its tensor-parallel query heads and its sequence shard's
    queries to the whole row's keys (gathered over `sequence`)."""
    batch, length, heads = query.shape[:3]
    kv_heads = key.shape[2]
    tensor = axis_size(jax.sharding.get_abstract_mesh(), "tensor")
    if documents is None:
        documents = jnp.zeros((batch, length), jnp.int32)
    # With fewer kv heads than tensor ranks (or not a multiple), kv heads are replicated and
    # each device picks the kv head of each of its query heads.
    kv_sharded = kv_heads % tensor == 0
    local_heads, group = heads // tensor, heads // kv_heads

    def local(query, key, value, documents):
        if not kv_sharded:
            first = jax.lax.axis_index("tensor") * local_heads
            wanted = (first + jnp.arange(local_heads)) // group
            key, value = jnp.take(key, wanted, axis=2), jnp.take(value, wanted, axis=2)
        return attention_across_shards(query, key, value, documents, scale=scale, impl=impl,
                                       zigzag=zigzag)

    q_axes = ("batch", "sequence", "heads", "head_dim")
    kv_axes = ("batch", "sequence", "kv_heads" if kv_sharded else None, "head_dim")
    return shard_map_logical(local, (q_axes, kv_axes, kv_axes, ("batch", "sequence")), q_axes)(
        query, key, value, documents)
