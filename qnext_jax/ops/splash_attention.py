"""TPU attention through JAX's Pallas splash attention kernel, with documents as segment ids.

Splash (jax.experimental.pallas.ops.tpu.splash_attention) is the maintained TPU flash kernel
that has what the architecture needs: causal masking with a query offset, segment ids for
packed documents (we pass document indices, so reused raw ids stay apart), GQA without
repeating keys (query head n reads kv head n // G), head_dim 256, and its own backward.
Its mask is static, so where the queries start at a traced offset (a sequence shard, a zig-zag
chunk) one kernel per possible offset is built and `lax.switch` picks this device's.

Block sizes are multiples of 128 (the TPU lane width); other lengths fall back to the
blockwise XLA attention (ops/blockwise_attention.py), with the reason logged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

_LANES = 128
_MAX_BLOCK = 512


def splash_unsupported_reason(q_len: int, kv_len: int) -> str | None:
    """Why splash cannot run these lengths, or None."""
    for name, size in (("query", q_len), ("key", kv_len)):
        if size % _LANES:
            return f"the {name} length {size} is not a multiple of {_LANES}"
    return None


def splash_attention(q, k, v, q_docs, kv_docs, *, scale: float, offsets=None,
                     interpret: bool = False):
    """q [B, Tq, N, D]; k, v [B, Tk, K, D]; q_docs [B, Tq], kv_docs [B, Tk] document indices.
    offsets: (index, positions) when query 0 sits at positions[index] of the keys' row (index
    traced, positions static: a sequence shard or a zig-zag chunk), else None (queries and keys
    are the same tokens). Returns [B, Tq, N, D] in v's dtype."""
    q_len, heads = q.shape[1], q.shape[2]
    kv_len = k.shape[1]
    positions = (0,) if offsets is None else offsets[1]
    kernels = [_kernel(heads, q_len, kv_len, offset, interpret) for offset in positions]
    # Splash does not scale the scores; it takes heads first.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * jnp.asarray(scale, q.dtype), k, v))
    segments = kernel_lib.SegmentIds(q=q_docs.astype(jnp.int32), kv=kv_docs.astype(jnp.int32))

    def run(kernel):
        return lambda q, k, v, segments: jax.vmap(kernel)(q, k, v, segment_ids=segments)

    if len(kernels) == 1:
        out = run(kernels[0])(q, k, v, segments)
    else:
        out = jax.lax.switch(offsets[0], [run(kernel) for kernel in kernels], q, k, v, segments)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)


def _kernel(heads: int, q_len: int, kv_len: int, offset: int, interpret: bool):
    # Built per trace, not cached: the kernel holds its mask tables as jax arrays, and a kernel
    # reused in a later trace hands them to it as captured constants (which jax.export rejects).
    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((q_len, kv_len), offset=offset)] * heads)
    block_q, block_kv = _block(q_len), _block(kv_len)
    sizes = kernel_lib.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv)
    return kernel_lib.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                      interpret=interpret)


def _block(length: int) -> int:
    """The largest multiple of 128 up to 512 that divides `length`."""
    for block in range(_MAX_BLOCK, 0, -_LANES):
        if length % block == 0:
            return block
    raise ValueError(f"length {length} is not a multiple of {_LANES}")
