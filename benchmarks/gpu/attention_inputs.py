"""The attention rows of the device check (gpu/device_check.py): inputs with packed documents,
the implementations timed side by side, and their work count.

  mosaic_gpu  tokamax's Mosaic GPU flash kernel with our documents (ops/gpu_flash_attention.py)
  blockwise   the XLA online-softmax loop (ops/blockwise_attention.py): the fallback
  cudnn       jax.nn.dot_product_attention(implementation="cudnn"), causal over the whole row:
              its public API has no segment ids, so this peer attends across documents
              (a little more work than ours, never less)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qnext_jax.ops.causal_attention import causal_attention
from qnext_jax.ops.segments import document_index


def attention_inputs(batch, length, heads, kv_heads, dim, dtype, seed=0):
    """q [B, T, N, D], k, v [B, T, K, D] in `dtype`, document indices [B, T] (about three
    documents a row, the last reusing the first's raw id) and an fp32 cotangent for q's shape."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, length, heads, dim), dtype=np.float32)
    k, v = rng.standard_normal((2, batch, length, kv_heads, dim), dtype=np.float32)
    ids = np.ones((batch, length), np.int32)
    ids[:, length // 3: 2 * length // 3] = 2  # ids 1, 2, 1: three documents
    cotangent = rng.standard_normal(q.shape, dtype=np.float32)
    return ([jnp.asarray(x, dtype) for x in (q, k, v)]
            + [document_index(jnp.asarray(ids)), jnp.asarray(cotangent)])


def attention_fn(impl, start=None):
    """(q, k, v, docs) -> out for an implementation; `start`: the queries are the row's tokens
    from `start` on (a context-parallel shard; q shorter than k)."""
    def run(q, k, v, docs):
        scale = q.shape[-1] ** -0.5
        if impl == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                implementation="cudnn")
        offsets = None if start is None else (jnp.int32(0), (start,))
        q_docs = docs if start is None else docs[:, start:start + q.shape[1]]
        return causal_attention(q, k, v, q_docs, docs, scale=scale, impl=impl, offsets=offsets)
    return run


def forward_and_backward(impl, start=None):
    """(forward, forward + backward -> (out, dq, dk, dv)) of one implementation."""
    forward = attention_fn(impl, start)

    def both(q, k, v, docs, cotangent):
        def loss(q, k, v):
            out = forward(q, k, v, docs)
            return jnp.sum(out.astype(jnp.float32) * cotangent), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    return (lambda q, k, v, docs, cotangent: forward(q, k, v, docs)), both


def causal_flops(batch, length, heads, dim):
    """(forward, backward) FLOPs of causal attention over the whole row: two products of
    B N T^2 D / 2 multiply-adds forward, five backward (S and dP recomputed, dV, dK, dQ)."""
    product = 2 * batch * heads * length * length * dim / 2
    return 2 * product, 5 * product
