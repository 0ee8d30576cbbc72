"""The routed SwiGLU experts of one device: every token times its top-k experts, dropless.

Rows sorted by expert and two grouped matmuls (ops/grouped_matmul.py: gate and up fused, then
down) on GPU and TPU, or for fewer rows than experts (decoding) each choice's expert gathered;
on CPU capacity buckets with overflow tiles (ops/bucketed_swiglu.py), which XLA:CPU runs
faster.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qnext_jax.ops.bucketed_swiglu import DEFAULT_TILE, bucketed_swiglu
from qnext_jax.ops.grouped_matmul import grouped_matmul
from qnext_jax.ops.platform import target_platform
from qnext_jax.ops.take_rows import combine_sorted, take_sorted_copies


# Fewer grouped-matmul rows than this per local expert (a decode step's) gather each choice's
# expert instead (gathered_swiglu).
GATHER_BELOW_ROWS_PER_EXPERT = 1
# Gate and up are fused (one concatenation of the weights a step) for at least this many
# grouped-matmul rows per local expert: a training step's tens of thousands of rows, not a
# decode step's k per token.
FUSE_ROWS_PER_EXPERT = 4


def fused_gate_up(gate_w, up_w):
    """The gate and up projections [G, E, F] as one [G, E, 2F] (gate first): one grouped matmul
    for both. Fuse before gathering a sharded weight, so that the gathered copy is the fused
    one (fused after, the concatenation is a second copy: 2 GiB a layer for the 80B's 512
    experts gathered whole)."""
    return jnp.concatenate([gate_w, up_w], axis=2)


def grouped_swiglu(tokens, weights, experts, gate_up_w, down_w, impl: str = "auto", *,
                   max_choices: int | None = None):
    """Dropless SwiGLU experts as one grouped matmul for gate and up, and one for down.

    tokens [N, E]; weights, experts [N, k] (expert ids >= the number of local experts, G, are
    choices that live elsewhere and are skipped); gate_up_w [G, E, 2F] (`fused_gate_up`), or
    (gate_w, up_w) [G, E, F] each, fused here where a grouped GEMM kernel runs on enough rows
    (FUSE_ROWS_PER_EXPERT) and kept apart on CPU; down_w [G, F, E]. Fewer rows than local
    experts (a decode step) gather each choice's expert instead (`gathered_swiglu`).
    impl: the grouped matmul's (ops/grouped_matmul.py); "auto" on CPU is capacity buckets.
    max_choices: at most this many choices are not skipped (the caller guarantees it): the
        grouped matmuls then run on that many rows instead of N * k (the expert-parallel
        receive buffer, whose tokens carry k ids of which about k / S are local).
    Returns [N, E]: for every token the sum over its choices of weight * expert(token).
    """
    num_tokens, top_k = experts.shape
    separate = isinstance(gate_up_w, tuple)  # (gate_w, up_w), not yet fused
    on_cpu = target_platform() == "cpu"
    if impl == "auto" and on_cpu and experts.size > DEFAULT_TILE:
        # XLA:CPU has no grouped GEMM: per-expert buckets as batched matmuls (few rows, as in
        # decoding, take the gathered grouped matmul below).
        gate_w, up_w = gate_up_w if separate else _split(gate_up_w)
        return bucketed_swiglu(tokens, weights, experts, gate_w, up_w, down_w)
    num_groups = down_w.shape[0]
    flat_experts = experts.reshape(-1)  # [N*k]
    rows_computed = flat_experts.size if max_choices is None else min(max_choices,
                                                                      flat_experts.size)
    if not on_cpu and rows_computed < GATHER_BELOW_ROWS_PER_EXPERT * num_groups:
        gate_w, up_w = gate_up_w if separate else _split(gate_up_w)
        return gathered_swiglu(tokens, weights, experts, gate_w, up_w, down_w)
    if separate and not on_cpu and rows_computed >= FUSE_ROWS_PER_EXPERT * num_groups:
        gate_up_w, separate = fused_gate_up(*gate_up_w), False
    # Skipped choices sort last, so the first `rows_computed` hold every computed one.
    order = jnp.argsort(flat_experts, stable=True)[:rows_computed]
    group_sizes = jnp.bincount(flat_experts, length=num_groups).astype(jnp.int32)
    if rows_computed < flat_experts.size:  # never more rows in the groups than computed
        ends = jnp.minimum(jnp.cumsum(group_sizes), rows_computed)
        group_sizes = jnp.diff(ends, prepend=0).astype(jnp.int32)
    # The grouped matmuls leave the rows past the last group unwritten (GPU and TPU kernels),
    # in their outputs and in the rows' gradients. Masked around each product (grouped_matmul's
    # default), every [rows, E] buffer would be copied twice each way: 1.25 GiB a copy for the
    # 80B's dropless expert-parallel rows. Here the permutations on either side read only the
    # first `computed` rows (their gradients included), and the projections are masked inside
    # the SwiGLU's elementwise fusion, before silu, so unwritten values meet only selects.
    computed = jnp.sum(group_sizes)
    # [rows, E] grouped by expert; a token's k gradient rows are summed in fp32.
    rows = take_sorted_copies(tokens, order, top_k, computed)
    # Gate and up as one product: the rows' gradient comes out of one kernel, not two to add.
    # With few rows (decoding; and on CPU, where each row is multiplied by its own gathered
    # expert) the two stay apart: fusing copies every expert's gate and up weights, each step,
    # for a handful of rows (256 MiB a layer for the 80B's experts on 2 of 8 H100s).
    if separate:
        gate, up = (grouped_matmul(rows, w, group_sizes, impl=impl, zero_past_rows=False)
                    for w in gate_up_w)
    else:
        gate, up = _split(grouped_matmul(rows, gate_up_w, group_sizes, impl=impl,
                                         zero_past_rows=False))  # [rows, F] each
    valid = (jnp.arange(rows_computed) < computed)[:, None]
    hidden = jax.nn.silu(jnp.where(valid, gate, 0)) * jnp.where(valid, up, 0)
    out_sorted = grouped_matmul(hidden, down_w, group_sizes, impl=impl,
                                zero_past_rows=False)  # [rows, E]
    # Back to token order, weighted; memory proportional to the rows computed.
    return combine_sorted(out_sorted, order, weights, computed)


def gathered_swiglu(tokens, weights, experts, gate_w, up_w, down_w):
    """Each choice times its own expert's weights, gathered: for a decode step's few rows.

    A grouped-matmul kernel takes the layer's experts whole as its operand; in a loop over
    stacked layers that operand is a slice the compiler must copy out first: every local
    expert's weights, each step (384 MiB a layer for the 80B on 2 of 8 H100s), to use ten a
    token. Gathered, each choice reads its expert alone (the gather reads the stacked weights
    through the slice). Ids >= the number of local experts are skipped (weight 0).
    tokens [N, E]; weights, experts [N, k]; gate_w, up_w [G, E, F]; down_w [G, F, E]."""
    local = down_w.shape[0]
    held = experts < local
    ids = jnp.where(held, experts, 0)

    def project(x, w, spec):
        return jnp.einsum(spec, x, w[ids], preferred_element_type=jnp.float32)

    gate = project(tokens, gate_w, "NE,NKEF->NKF")
    up = project(tokens, up_w, "NE,NKEF->NKF")
    hidden = (jax.nn.silu(gate) * up).astype(tokens.dtype)
    out = project(hidden, down_w, "NKF,NKFE->NKE")  # [N, k, E] fp32
    scale = jnp.where(held, weights, 0).astype(jnp.float32)
    return jnp.einsum("NKE,NK->NE", out, scale).astype(tokens.dtype)


def _split(gate_up):
    """[..., 2F] -> ([..., F], [..., F]): gate first, as fused_gate_up puts it."""
    width = gate_up.shape[-1] // 2
    return gate_up[..., :width], gate_up[..., width:]
