"""The Gated DeltaNet mixer (spec section 2): projections, causal short conv + SiLU, gates,
the gated delta rule, gated RMSNorm and the output projection.

HF fuses q/k/v/z into `in_proj_qkvz` grouped per key head and b/a into `in_proj_ba`; we keep one
kernel per tensor with explicit head axes, so every weight shards by heads and the conversion
(qnext_jax/convert) is a pure re-indexing. The short conv is per channel, so splitting its
weight into q / k / v parts changes nothing numerically.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import ModelConfig
from qnext_jax.model.norms import GatedRMSNorm
from qnext_jax.model.params import cast, compute_dtype, constant_param, normal_param, param
from qnext_jax.model.projections import project_together
from qnext_jax.ops import gated_delta_rule
from qnext_jax.ops.causal_conv import causal_conv_silu
from qnext_jax.ops.segments import document_index
from qnext_jax.parallel.axes import shard_map_logical, under_mesh
from qnext_jax.parallel.context_parallel import conv_silu_across_shards, delta_rule_across_shards

KEY_PROJ = ("embed", "key_heads", "head_dim")
VALUE_PROJ = ("embed", "value_heads", "head_dim")
KEY_CONV = ("conv", "key_heads", "head_dim")
VALUE_CONV = ("conv", "value_heads", "head_dim")


class GatedDeltaNet(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        hidden = config.hidden_size
        key_heads, value_heads = config.linear_num_key_heads, config.linear_num_value_heads
        key_dim, value_dim = config.linear_key_head_dim, config.linear_value_head_dim
        width = config.linear_conv_kernel_dim
        # Axis codes: E embed, K key heads, H value heads, D head dim, W conv width.
        self.q_proj = normal_param(rngs, (hidden, key_heads, key_dim), config, KEY_PROJ)  # EKD
        self.k_proj = normal_param(rngs, (hidden, key_heads, key_dim), config, KEY_PROJ)  # EKD
        self.v_proj = normal_param(rngs, (hidden, value_heads, value_dim), config, VALUE_PROJ)  # EHD
        self.z_proj = normal_param(rngs, (hidden, value_heads, value_dim), config, VALUE_PROJ)  # EHD
        self.b_proj = normal_param(rngs, (hidden, value_heads), config, ("embed", "value_heads"))  # EH
        self.a_proj = normal_param(rngs, (hidden, value_heads), config, ("embed", "value_heads"))  # EH
        self.conv_q = normal_param(rngs, (width, key_heads, key_dim), config, KEY_CONV)  # WKD
        self.conv_k = normal_param(rngs, (width, key_heads, key_dim), config, KEY_CONV)  # WKD
        self.conv_v = normal_param(rngs, (width, value_heads, value_dim), config, VALUE_CONV)  # WHD
        # fp32 whatever param_dtype says (as HF keeps them): they set g, the state's decay.
        self.dt_bias = constant_param(1.0, (value_heads,), config, ("value_heads",), jnp.float32)
        decay_rates = jax.random.uniform(rngs.params(), (value_heads,), jnp.float32, 0.01, 16.0)
        self.A_log = param(jnp.log(decay_rates), config, ("value_heads",), jnp.float32)
        self.norm = GatedRMSNorm(value_dim, config)
        self.out_proj = normal_param(rngs, (value_heads, value_dim, hidden), config, ("value_heads", "head_dim", "embed"))  # HDE

    def __call__(self, x, *, segment_ids):
        """x: [B, T, E] -> [B, T, E]. segment_ids [B, T] (or None) restart conv and state."""
        query, key, value, z, g, beta = self.project(x)
        out = self._conv_and_delta_rule(query, key, value, g, beta, self.conv_weights(), segment_ids)
        return self.finish(out, z)

    def project(self, x):
        """x [B, T, E] -> the rule's inputs before the short conv: query, key [B, T, Hk, D],
        value, z [B, T, Hv, D] in the compute dtype; g (log-decay) fp32, beta [B, T, Hv]."""
        dtype = compute_dtype(self.config)
        kernels = (self.q_proj, self.k_proj, self.v_proj, self.z_proj, self.b_proj, self.a_proj)
        query, key, value, z, b, a = project_together(
            x.astype(dtype), [cast(kernel, dtype) for kernel in kernels])
        beta = jax.nn.sigmoid(b)  # in the activation dtype, as HF
        decay_rate = jnp.exp(self.A_log[...].astype(jnp.float32))
        g = -decay_rate * jax.nn.softplus(a.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        return query, key, value, z, g, beta

    def conv_weights(self):
        """The short conv's (q, k, v) kernels [W, heads, D] in the compute dtype."""
        dtype = compute_dtype(self.config)
        return tuple(cast(w, dtype) for w in (self.conv_q, self.conv_k, self.conv_v))

    def finish(self, out, z):
        """The rule's output [B, T, Hv, D] -> gated norm -> output projection [B, T, E]."""
        out = self.norm(out, z)
        return jnp.einsum("BTHD,HDE->BTE", out, cast(self.out_proj, compute_dtype(self.config)))

    def _conv_and_delta_rule(self, query, key, value, g, beta, convs, segment_ids):
        def rule(query, key, value, g, beta, documents, initial_state):
            return gated_delta_rule(query, key, value, g, beta, segment_ids=documents,
                                    initial_state=initial_state, impl=self.config.delta_rule_impl,
                                    normalize_qk=True)

        if not under_mesh():
            query, key, value = (causal_conv_silu(x, w, segment_ids=segment_ids)
                                 for x, w in zip((query, key, value), convs))
            return rule(query, key, value, g, beta, segment_ids, None)[0]

        # Rows and heads are independent: each device runs the conv and the rule (a Pallas
        # kernel on GPU/TPU, which GSPMD could not partition) on its own rows and tensor-parallel
        # heads. Value head h reads key head h // (Hv / Hk); both split contiguously over
        # `tensor`, so each device's value heads find their key heads on the same device. With
        # the sequence split, the shards exchange conv halos and delta-rule states.
        batch, length = query.shape[:2]
        documents = (jnp.zeros((batch, length), jnp.int32) if segment_ids is None
                     else document_index(segment_ids))  # over the whole row

        def local(query, key, value, g, beta, conv_q, conv_k, conv_v, documents):
            query, key, value = (conv_silu_across_shards(x, w, documents)
                                 for x, w in zip((query, key, value), (conv_q, conv_k, conv_v)))
            state = jnp.zeros((query.shape[0], value.shape[2], query.shape[3], value.shape[3]),
                              jnp.float32)
            return delta_rule_across_shards(rule, query, key, value, g, beta, documents, state)[0]

        heads = ("batch", "sequence", "key_heads", "head_dim")
        value_heads = ("batch", "sequence", "value_heads", "head_dim")
        gates = ("batch", "sequence", "value_heads")
        in_axes = (heads, heads, value_heads, gates, gates, KEY_CONV, KEY_CONV, VALUE_CONV,
                   ("batch", "sequence"))
        return shard_map_logical(local, in_axes, value_heads)(
            query, key, value, g, beta, *convs, documents)
