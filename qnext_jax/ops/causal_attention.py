"""Causal, document-masked attention: one entry point, an implementation per backend.

  blockwise  online softmax over key blocks in XLA (ops/blockwise_attention.py): every backend,
             O(T * block) memory; what `auto` picks on CPU and GPU
  splash     JAX's Pallas splash attention kernel (ops/splash_attention.py): `auto` on TPU;
             runs in Pallas' interpret mode on CPU (for tests)

On GPU no maintained kernel has all of what this model needs — causal masking from a query
offset (context parallelism), packed documents, GQA, head_dim 256 and a backward pass:
cuDNN (jax.nn.dot_product_attention) takes no segment ids (only a dense [T, T] mask), Pallas'
GPU `mha` has no GQA and no query offset, and tokamax's kernels take documents only through a
private mask type whose Triton backward densifies it to [T, T]. So GPUs run `blockwise` until
one does.
"""

from __future__ import annotations

import logging

import jax.numpy as jnp

from qnext_jax.ops.blockwise_attention import blockwise_attention
from qnext_jax.ops.platform import target_platform
from qnext_jax.ops.splash_attention import splash_attention, splash_unsupported_reason

IMPLEMENTATIONS = ("auto", "blockwise", "splash")
log = logging.getLogger(__name__)
_reported: set[str] = set()


def resolve_implementation(impl: str, q_len: int, kv_len: int) -> str:
    """The implementation that runs: `auto` per backend; splash falls back (logged once) for
    lengths its blocks cannot tile."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        impl = "splash" if target_platform() == "tpu" else "blockwise"
    if impl == "splash":
        if target_platform() not in ("tpu", "cpu"):
            raise ValueError("attention impl 'splash' is a TPU kernel (CPU runs it interpreted); "
                             f"this platform is {target_platform()}: use 'auto' or 'blockwise'")
        reason = splash_unsupported_reason(q_len, kv_len)
        if reason:
            if reason not in _reported:
                _reported.add(reason)
                log.warning("attention: blockwise instead of splash: %s", reason)
            return "blockwise"
    return impl


def causal_attention(q, k, v, q_docs, kv_docs, *, scale: float, impl: str = "auto", shard=None):
    """q [B, Tq, N, D]; k, v [B, Tk, K, D] (N a multiple of K); q_docs [B, Tq], kv_docs [B, Tk]
    document indices. shard: (index, count) when the queries are sequence shard `index` of
    `count` equal shards of the keys' row (their global positions start at index * Tq)."""
    impl = resolve_implementation(impl, q.shape[1], k.shape[1])
    if q_docs is None or kv_docs is None:  # one document
        q_docs = jnp.zeros(q.shape[:2], jnp.int32)
        kv_docs = jnp.zeros(k.shape[:2], jnp.int32)
    if impl == "splash":
        return splash_attention(q, k, v, q_docs, kv_docs, scale=scale, shard=shard,
                                interpret=target_platform() == "cpu")
    offset = 0 if shard is None else shard[0] * q.shape[1]
    return blockwise_attention(q, k, v, q_docs=q_docs, kv_docs=kv_docs, q_offset=offset,
                               scale=scale)
