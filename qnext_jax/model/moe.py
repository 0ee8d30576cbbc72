"""The sparse MoE block (spec section 5): fp32 softmax router -> top-k -> renormalise, SwiGLU
experts computed dropless, plus one always-on shared expert behind a sigmoid gate.

Two implementations of the routed experts compute the same thing:
  "ragged": tokens sorted by expert and multiplied with `jax.lax.ragged_dot` (grouped matmul),
            work proportional to k, not to the number of experts; under a mesh the experts are
            split over the `expert` axis and tokens travel to them (parallel/expert_parallel.py);
  "dense":  every expert on every token, combined with the routing weights (the test reference).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import ModelConfig
from qnext_jax.model.mlp import SwiGLU
from qnext_jax.model.params import cast, compute_dtype, normal_param, param
from qnext_jax.model.projections import project_together
from qnext_jax.parallel.axes import under_mesh
from qnext_jax.ops.grouped_swiglu import grouped_swiglu
from qnext_jax.parallel.expert_parallel import EXPERT_IN, EXPERT_OUT, expert_parallel_ffn


class RouterStats(NamedTuple):
    """Per MoE layer, sums over the valid tokens of the batch (for the router losses). Sums,
    not means, so that shards and micro-batches combine by addition."""

    expert_counts: jnp.ndarray  # [E] how many top-k selections chose each expert (no gradient)
    prob_sums: jnp.ndarray  # [E] sum of router probabilities (carries the gradient)
    z_sums: jnp.ndarray  # [] sum of logsumexp(router logits)^2 (the router z-loss)
    num_tokens: jnp.ndarray  # [] number of valid tokens counted
    # The same sums per row (the sequence-scope balancing loss); unused, XLA drops them.
    row_expert_counts: jnp.ndarray  # [B, E]
    row_prob_sums: jnp.ndarray  # [B, E]
    row_tokens: jnp.ndarray  # [B]


def normalized_router_init(key, hidden: int, num_experts: int, std: float) -> jnp.ndarray:
    """[E_in=hidden, experts] kernel whose every expert column has the same L2 norm.

    Drawn normal(0, std) and rescaled to the expected norm std * sqrt(hidden): at step 0 no
    expert is favoured by a larger weight vector, only by its direction.
    """
    kernel = std * jax.random.normal(key, (hidden, num_experts), jnp.float32)
    norms = jnp.linalg.norm(kernel, axis=0, keepdims=True)
    return kernel * (std * jnp.sqrt(hidden) / norms)


def route(logits: jnp.ndarray, top_k: int, normalize: bool):
    """logits [N, E] -> (probs fp32 [N, E], weights fp32 [N, k], experts int32 [N, k])."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts


class SparseMoE(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        hidden, experts, width = config.hidden_size, config.num_experts, config.moe_intermediate_size
        if config.router_init == "normalised":
            router = normalized_router_init(rngs.params(), hidden, experts, config.initializer_range)
        else:  # HF's default: every linear normal(0, std), expert norms as they fall
            router = config.initializer_range * jax.random.normal(
                rngs.params(), (hidden, experts), jnp.float32)
        self.router = param(router, config, ("embed", None))  # EX: every rank scores every expert
        self.gate_proj = normal_param(rngs, (experts, hidden, width), config, EXPERT_IN)  # XEF
        self.up_proj = normal_param(rngs, (experts, hidden, width), config, EXPERT_IN)  # XEF
        self.down_proj = normal_param(rngs, (experts, width, hidden), config, EXPERT_OUT)  # XFE
        self.shared_expert = SwiGLU(config, config.shared_expert_intermediate_size, rngs=rngs)
        self.shared_expert_gate = normal_param(rngs, (hidden,), config, ("embed",))  # E

    def __call__(self, x, *, valid=None):
        """x: [B, T, E] -> ([B, T, E], RouterStats). valid: [B, T] mask of counted tokens."""
        config = self.config
        dtype = compute_dtype(config)
        batch, length, hidden = x.shape
        tokens = x.astype(dtype).reshape(batch * length, hidden)
        logits, shared_gate_logit = self.router_logits(tokens)
        probs, weights, experts = route(logits, config.num_experts_per_tok, config.norm_topk_prob)
        weights = weights.astype(dtype)
        if config.moe_impl == "dense":
            routed = self.experts_dense(tokens, weights, experts)
        elif under_mesh():
            routed = expert_parallel_ffn(
                tokens, weights, experts, *self._expert_weights(dtype),
                capacity_factor=config.moe_capacity_factor, impl=config.grouped_matmul,
            )
        else:
            gate_w, up_w, down_w = self._expert_weights(dtype)
            routed = grouped_swiglu(tokens, weights, experts, (gate_w, up_w), down_w,
                                    config.grouped_matmul)
        shared_gate = jax.nn.sigmoid(shared_gate_logit).astype(dtype)
        out = routed + shared_gate * self.shared_expert(tokens)
        stats = router_stats(logits, probs, experts, config.num_experts, valid, batch)
        return out.reshape(batch, length, hidden), stats

    def router_logits(self, tokens):
        """tokens [N, E] -> (router logits [N, X], the shared expert's gate logit [N, 1]), in
        fp32 from fp32 weights (or in the compute dtype: config.router_dtype)."""
        dtype = jnp.float32 if self.config.router_dtype == "float32" else tokens.dtype
        return project_together(
            tokens.astype(dtype),
            [cast(self.router, dtype), cast(self.shared_expert_gate, dtype)[:, None]])

    def _expert_weights(self, dtype):
        return cast(self.gate_proj, dtype), cast(self.up_proj, dtype), cast(self.down_proj, dtype)

    def experts_dense(self, tokens, weights, experts):
        """Every expert on every token; the reference the ragged path is tested against."""
        gate_w, up_w, down_w = self._expert_weights(tokens.dtype)
        gate = jnp.einsum("NE,XEF->NXF", tokens, gate_w)
        up = jnp.einsum("NE,XEF->NXF", tokens, up_w)
        out = jnp.einsum("NXF,XFE->NXE", jax.nn.silu(gate) * up, down_w)  # [N, X, E]
        combine = jnp.zeros(out.shape[:2], weights.dtype)
        combine = combine.at[jnp.arange(tokens.shape[0])[:, None], experts].add(weights)  # [N, X]
        return jnp.einsum("NXE,NX->NE", out, combine)


def router_stats(logits, probs, experts, num_experts, valid, rows: int) -> RouterStats:
    """Sums over valid tokens (N = rows * T of them); `valid` [B, T] or None (all valid)."""
    if valid is None:
        mask = jnp.ones(probs.shape[:1], jnp.float32)
    else:
        mask = valid.reshape(-1).astype(jnp.float32)
    selected = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(axis=1)  # [N, X]
    counts = jax.lax.stop_gradient(jnp.einsum("NX,N->X", selected, mask))
    prob_sums = jnp.einsum("NX,N->X", probs, mask)
    log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [N]
    by_row = lambda x: x.reshape(rows, -1, *x.shape[1:])  # [N, ...] -> [B, T, ...]
    row_mask = by_row(mask)
    row_counts = jax.lax.stop_gradient(jnp.einsum("BTX,BT->BX", by_row(selected), row_mask))
    row_probs = jnp.einsum("BTX,BT->BX", by_row(probs), row_mask)
    return RouterStats(counts, prob_sums, jnp.sum(mask * log_z * log_z), jnp.sum(mask),
                       row_counts, row_probs, jnp.sum(row_mask, axis=1))
