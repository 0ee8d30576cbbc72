"""The routed SwiGLU experts of one device: every token times its top-k experts, dropless.

Rows sorted by expert and three grouped matmuls (ops/grouped_matmul.py) on GPU and TPU; on CPU
capacity buckets with overflow tiles (ops/bucketed_swiglu.py), which XLA:CPU runs faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qnext_jax.ops.bucketed_swiglu import DEFAULT_TILE, bucketed_swiglu
from qnext_jax.ops.grouped_matmul import grouped_matmul
from qnext_jax.ops.platform import target_platform
from qnext_jax.ops.take_rows import take_sorted_copies


def grouped_swiglu(tokens, weights, experts, gate_w, up_w, down_w, impl: str = "auto"):
    """Dropless SwiGLU experts as one grouped matmul per projection.

    tokens [N, E]; weights, experts [N, k] (expert ids >= the number of local experts, G, are
    choices that live elsewhere and are skipped); gate_w, up_w [G, E, F]; down_w [G, F, E].
    impl: the grouped matmul's (ops/grouped_matmul.py); "auto" on CPU is capacity buckets.
    Returns [N, E]: for every token the sum over its choices of weight * expert(token).
    """
    num_tokens, top_k = experts.shape
    num_groups = gate_w.shape[0]
    if impl == "auto" and target_platform() == "cpu" and experts.size > DEFAULT_TILE:
        # XLA:CPU has no grouped GEMM: per-expert buckets as batched matmuls (few rows, as in
        # decoding, take the gathered grouped matmul below).
        return bucketed_swiglu(tokens, weights, experts, gate_w, up_w, down_w)
    flat_experts = experts.reshape(-1)  # [N*k]
    order = jnp.argsort(flat_experts, stable=True)  # skipped choices sort last
    # [N*k, E] grouped by expert; a token's k gradient rows are summed in fp32.
    rows = take_sorted_copies(tokens, order, top_k)
    group_sizes = jnp.bincount(flat_experts, length=num_groups).astype(jnp.int32)
    gate = grouped_matmul(rows, gate_w, group_sizes, impl=impl)  # [N*k, F]
    up = grouped_matmul(rows, up_w, group_sizes, impl=impl)
    out_sorted = grouped_matmul(jax.nn.silu(gate) * up, down_w, group_sizes,
                                impl=impl)  # [N*k, E]
    # Rows past the last group are not computed; zero them rather than trust their contents.
    computed = (flat_experts[order] < num_groups)[:, None]
    out_sorted = jnp.where(computed, out_sorted, 0)
    # Back to token order by a gather (the inverse permutation), which XLA fuses into the
    # weighted sum over the k choices: no [N*k, E] unsorted copy is written.
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    out = out_sorted[inverse].reshape(num_tokens, top_k, -1)
    return jnp.einsum("NKE,NK->NE", out, weights)
