"""Causal, document-masked attention: one entry point, an implementation per backend.

  blockwise   online softmax over key blocks in XLA (ops/blockwise_attention.py): every
              backend, O(T * block) memory; what `auto` picks on CPU, and on GPUs the kernel
              below does not take
  splash      JAX's Pallas splash attention kernel (ops/splash_attention.py): `auto` on TPU;
              runs in Pallas' interpret mode on CPU (for tests)
  mosaic_gpu  tokamax's Mosaic GPU flash attention (ops/gpu_flash_attention.py): `auto` on
              Hopper for bf16/fp16 operands; documents as per-query key ranges
"""

from __future__ import annotations

import logging

import jax.numpy as jnp

from qnext_jax.ops.blockwise_attention import blockwise_attention
from qnext_jax.ops.gpu_flash_attention import gpu_flash_attention, gpu_flash_unsupported_reason
from qnext_jax.ops.platform import target_platform
from qnext_jax.ops.splash_attention import splash_attention, splash_unsupported_reason

IMPLEMENTATIONS = ("auto", "blockwise", "splash", "mosaic_gpu")
# The Mosaic GPU kernel tiles queries by twice its 64-row block.
_MOSAIC_QUERY_TILE = 128
log = logging.getLogger(__name__)
_reported: set[str] = set()


def _fall_back(reason: str) -> str:
    if reason not in _reported:
        _reported.add(reason)
        log.warning("attention: blockwise instead of the kernel: %s", reason)
    return "blockwise"


def mosaic_gpu_unsupported_reason(q_len: int, dtype) -> str | None:
    """Why the Mosaic GPU kernel cannot run these queries here, or None."""
    if q_len % _MOSAIC_QUERY_TILE:
        return f"the query length {q_len} is not a multiple of {_MOSAIC_QUERY_TILE}"
    return gpu_flash_unsupported_reason(dtype)


def resolve_implementation(impl: str, q_len: int, kv_len: int, dtype=jnp.bfloat16) -> str:
    """The implementation that runs: `auto` per backend; a kernel falls back (logged once) for
    shapes or dtypes it cannot take."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    platform = target_platform()
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "mosaic_gpu"}.get(platform, "blockwise")
        if impl == "mosaic_gpu" and jnp.dtype(dtype) == jnp.float32:
            return "blockwise"  # fp32 runs: the kernel would round the operands to bf16
    if impl == "splash":
        if platform not in ("tpu", "cpu"):
            raise ValueError("attention impl 'splash' is a TPU kernel (CPU runs it interpreted); "
                             f"this platform is {platform}: use 'auto' or 'blockwise'")
        reason = splash_unsupported_reason(q_len, kv_len)
        return _fall_back(reason) if reason else impl
    if impl == "mosaic_gpu":
        if platform != "gpu":
            raise ValueError("attention impl 'mosaic_gpu' is a GPU kernel; this platform is "
                             f"{platform}: use 'auto' or 'blockwise'")
        reason = mosaic_gpu_unsupported_reason(q_len, dtype)
        return _fall_back(reason) if reason else impl
    return impl


def causal_attention(q, k, v, q_docs, kv_docs, *, scale: float, impl: str = "auto", shard=None,
                     offsets=None):
    """q [B, Tq, N, D]; k, v [B, Tk, K, D] (N a multiple of K); q_docs [B, Tq], kv_docs [B, Tk]
    document indices. Where the queries sit in the keys' row (default: the same tokens):
      shard    (index, count): sequence shard `index` (traced) of `count` equal shards of the
               row, so query 0 is at index * Tq;
      offsets  (index, positions): query 0 is at positions[index] (index traced, positions a
               static tuple): a zig-zag chunk (parallel/context_parallel.py)."""
    impl = resolve_implementation(impl, q.shape[1], k.shape[1], q.dtype)
    if q_docs is None or kv_docs is None:  # one document
        q_docs = jnp.zeros(q.shape[:2], jnp.int32)
        kv_docs = jnp.zeros(k.shape[:2], jnp.int32)
    if shard is not None:
        offsets = (shard[0], tuple(i * q.shape[1] for i in range(shard[1])))
    if impl == "splash":
        return splash_attention(q, k, v, q_docs, kv_docs, scale=scale, offsets=offsets,
                                interpret=target_platform() == "cpu")
    offset = None if offsets is None else jnp.asarray(offsets[1], jnp.int32)[offsets[0]]
    if impl == "mosaic_gpu":
        return gpu_flash_attention(q, k, v, q_docs, kv_docs, scale=scale, q_offset=offset)
    return blockwise_attention(q, k, v, q_docs=q_docs, kv_docs=kv_docs,
                               q_offset=0 if offset is None else offset, scale=scale)
