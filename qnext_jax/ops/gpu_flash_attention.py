"""GPU attention through tokamax's Mosaic GPU flash attention kernel, documents as key ranges.

Why this kernel (sources read: tokamax 0.0.12 and 0.0.17, jax 0.10 and 0.12): it is the one
maintained GPU kernel with everything the architecture needs, forward and backward —
  - GQA without repeated keys (query head n reads kv head n // G), head_dim 256 on Hopper
    (the SM90 heuristics shrink the key block to fit shared memory), bf16 operands with fp32
    softmax and accumulation, and its own SM90 backward (`pallas_mosaic_gpu_vjp`);
  - a mask given as a key range per query, [k_start, k_end), which the kernel keeps as ranges
    (no [T, T] array; key blocks outside a query block's range are skipped in the forward).
Packed documents are exactly such ranges: our document indices are monotone along a row
(ops/segments.document_index), so a query sees the keys from its document's first token to
itself. That keeps reused raw segment ids apart, as everywhere else in the model. Causality is
the kernel's static flag on one device, and `k_end = position + 1` when the queries are a
context-parallel shard (their global positions start at an offset).
The others fall short: cuDNN's fused attention (jax.nn.dot_product_attention) takes packed rows
only through private THD offsets whose causal mask is top-left per segment, so it cannot place a
query shard at an offset; Pallas' GPU `mha` has segment ids but no GQA and no query offset;
tokamax's Triton path densifies such masks to [B, 1, T, T] in its backward.

The entry point takes the op so tests can run the same masks through tokamax's XLA reference
implementation on CPU (the Mosaic GPU kernel needs a Hopper GPU, or its compile-only stand-in).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qnext_jax.ops.platform import let_tokamax_read_its_flags

KERNEL_DTYPES = (jnp.bfloat16, jnp.float16)


def document_starts(q_docs, kv_docs):
    """[B, Tq]: the index of the first key of each query's document (kv_docs [B, Tk] monotone
    document indices over the keys' row; q_docs [B, Tq] the queries' indices in it)."""
    # A sort-based search: the default one is a while loop of log2(Tk) steps in XLA.
    return jax.vmap(functools.partial(jnp.searchsorted, side="left", method="sort"))(
        kv_docs.astype(jnp.int32), q_docs.astype(jnp.int32)).astype(jnp.int32)


def document_mask(q_docs, kv_docs, q_offset=None):
    """tokamax's Mask for causal attention within documents: each query sees the keys
    [start of its document, its own position]. q_offset: the global position of query 0 (a
    context-parallel shard; may be traced), or None when queries and keys are the same tokens."""
    from tokamax._src.ops.attention import base

    k_start = document_starts(q_docs, kv_docs)[:, None, :]  # [B, 1 (every head), Tq]
    if q_offset is None:
        return base.Mask(k_start=k_start, is_causal=True)
    positions = jnp.asarray(q_offset, jnp.int32) + jnp.arange(q_docs.shape[1], dtype=jnp.int32)
    return base.Mask(k_start=k_start, k_end=(positions + 1)[None, None, :])


@functools.cache
def mosaic_gpu_kernel():
    """tokamax's Mosaic GPU flash attention op. A private module (checked with tokamax 0.0.12
    and 0.0.17): a tokamax without it falls back to blockwise (gpu_flash_unsupported_reason)."""
    from tokamax._src.ops.attention import pallas_mosaic_gpu

    return pallas_mosaic_gpu.PallasMosaicGpuFlashAttention()


@functools.cache
def xla_reference_kernel():
    """tokamax's XLA implementation of the same op: the same Mask semantics, any backend."""
    from tokamax._src.ops.attention import base

    return base.DotProductAttention()


def gpu_flash_unsupported_reason(dtype) -> str | None:
    """Why the Mosaic GPU kernel cannot run here, or None. Checked before tracing so that a
    run falls back to blockwise attention with the reason logged, never in the middle of a
    backward pass."""
    try:
        from tokamax._src import gpu_utils
        from tokamax._src.ops.attention import pallas_mosaic_gpu  # noqa: F401
    except ImportError as error:
        return f"tokamax's Mosaic GPU attention is not installed ({error})"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in KERNEL_DTYPES]:
        return f"the kernel takes bf16 or fp16 operands, these are {jnp.dtype(dtype).name}"
    from jax.extend import backend

    device = backend.get_default_device()  # the compile-only H100 when the planner traces
    if not gpu_utils.is_sm90(device):
        return (f"the kernel's forward and backward are checked on Hopper (sm_90) only; the "
                f"device is {device.device_kind}")
    return None


def gpu_flash_attention(q, k, v, q_docs, kv_docs, *, scale: float, q_offset=None, kernel=None):
    """q [B, Tq, N, D]; k, v [B, Tk, K, D] (N a multiple of K); q_docs [B, Tq], kv_docs [B, Tk]
    monotone document indices; q_offset as in document_mask. kernel: the tokamax op (default:
    Mosaic GPU). Returns [B, Tq, N, D] in v's dtype."""
    let_tokamax_read_its_flags()
    kernel = mosaic_gpu_kernel() if kernel is None else kernel
    mask = document_mask(q_docs, kv_docs, q_offset)
    return kernel(q, k, v, mask=mask, logits_scale=scale).astype(v.dtype)
