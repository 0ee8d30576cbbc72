"""Causal, document-masked softmax attention over key blocks (online softmax), never [T, T].

    out[i] = sum_j softmax_j(scale * q_i . k_j) v_j  over  j <= q_offset + i, docs[j] == docs[i]

Memory is O(T * block) in the forward and the backward: a custom VJP keeps only the output and
each query's logsumexp, and the backward recomputes one [block_q, block_k] tile of scores at a
time (the FlashAttention-2 recurrences, in plain XLA). Key blocks a query block cannot see
(causally) are skipped, not masked, so causal attention costs about half of the full product.

`q_offset` places the queries inside a longer key sequence: with the sequence split over
devices, each device attends its own queries (global positions q_offset ...) to the keys
gathered from every device. GQA without repeated keys: query head n reads key head n // G.

Ours because no maintained kernel does this on every backend: XLA's `dot_product_attention`
and tokamax's XLA paths build the [T, T] scores (tokamax's chunked one keeps them for its
autodiff backward), and the fused GPU/TPU kernels do not run on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qnext_jax.ops.platform import target_platform

# Masked scores: finite, so a fully masked (padding) row gives zeros, not NaN.
_MASKED = -1e30
_PAD_QUERY_DOC, _PAD_KEY_DOC = -1, -2  # never equal to each other or to a real document index


def blockwise_attention(q, k, v, *, q_docs=None, kv_docs=None, q_offset=0, scale: float,
                        block_q: int | None = None, block_k: int | None = None):
    """q [B, Tq, N, D]; k [B, Tk, K, D]; v [B, Tk, K, Dv] with N a multiple of K.
    q_docs [B, Tq], kv_docs [B, Tk]: document indices (ops.segments.document_index; None: one
    document). q_offset: global position of query 0 in the key sequence (int, may be traced).
    block_q, block_k: tile sizes; None: 128 on CPU (small tiles let the causal skip drop
    nearly half the work, and a tile's loop step costs little there), else 512.
    Returns [B, Tq, N, Dv] in v's dtype; scores and softmax in fp32."""
    batch, q_len, heads, dim = q.shape
    if k.ndim != 4 or k.shape[0] != batch or k.shape[3] != dim or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k must be [B={batch}, Tk, K, D={dim}] and v [B, Tk, K, Dv]; got "
                         f"{k.shape} and {v.shape}")
    if heads % k.shape[2]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({k.shape[2]})")
    if q_docs is None:
        q_docs = jnp.zeros((batch, q_len), jnp.int32)
    if kv_docs is None:
        kv_docs = jnp.zeros(k.shape[:2], jnp.int32)
    if q_docs.shape != (batch, q_len) or kv_docs.shape != k.shape[:2]:
        raise ValueError(f"q_docs must be [B, Tq] = {(batch, q_len)} and kv_docs [B, Tk] = "
                         f"{k.shape[:2]}; got {q_docs.shape} and {kv_docs.shape}")
    default_block = 128 if target_platform() == "cpu" else 512
    block_q = min(block_q or default_block, q_len)
    block_k = min(block_k or default_block, k.shape[1])
    return _attention(q, k, v, q_docs.astype(jnp.int32), kv_docs.astype(jnp.int32),
                      jnp.asarray(q_offset, jnp.int32), float(scale), block_q, block_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _attention(q, k, v, q_docs, kv_docs, q_offset, scale, block_q, block_k):
    return _forward(q, k, v, q_docs, kv_docs, q_offset, scale, block_q, block_k)[0]


def _attention_fwd(q, k, v, q_docs, kv_docs, q_offset, scale, block_q, block_k):
    out, lse = _forward(q, k, v, q_docs, kv_docs, q_offset, scale, block_q, block_k)
    return out, (q, k, v, q_docs, kv_docs, q_offset, out, lse)


def _attention_bwd(scale, block_q, block_k, residuals, grad_out):
    q, k, v, q_docs, kv_docs, q_offset, out, lse = residuals
    grads = _backward(q, k, v, q_docs, kv_docs, q_offset, out, lse, grad_out, scale,
                      block_q, block_k)
    return (*grads, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


class _Blocks:
    """Padded, grouped operands and the tile arithmetic shared by forward and backward."""

    def __init__(self, q, k, v, q_docs, kv_docs, q_offset, scale, block_q, block_k):
        batch, self.q_len, heads, dim = q.shape
        self.k_len, kv_heads = k.shape[1], k.shape[2]
        self.heads, self.groups = heads, heads // kv_heads
        self.block_q, self.block_k, self.scale, self.q_offset = block_q, block_k, scale, q_offset
        self.num_q = -(-self.q_len // block_q)
        self.num_k = -(-self.k_len // block_k)
        pad_q, pad_k = self.num_q * block_q - self.q_len, self.num_k * block_k - self.k_len
        # Head-major once, here: every tile's matmuls then read contiguous [block, D] slices
        # with (batch, heads) as the batch dimensions, so no tile needs a transpose.
        grouped = q.reshape(batch, self.q_len, kv_heads, self.groups, dim)
        self.q = _pad_time(grouped, pad_q).transpose(0, 2, 3, 1, 4)  # [B, K, G, Tq, D]
        self.k = _pad_time(k, pad_k).transpose(0, 2, 1, 3)  # [B, K, Tk, D]
        self.v = _pad_time(v, pad_k).transpose(0, 2, 1, 3)
        self.q_docs = _pad_time(q_docs, pad_q, _PAD_QUERY_DOC)
        self.kv_docs = _pad_time(kv_docs, pad_k, _PAD_KEY_DOC)
        self.pad_q = pad_q

    def query_block(self, index):
        start = index * self.block_q
        return (_slice(self.q, start, self.block_q, axis=3),
                _slice(self.q_docs, start, self.block_q),
                self.q_offset + start + jnp.arange(self.block_q))

    def key_block(self, index):
        start = index * self.block_k
        return (_slice(self.k, start, self.block_k, axis=2),
                _slice(self.v, start, self.block_k, axis=2),
                _slice(self.kv_docs, start, self.block_k), start + jnp.arange(self.block_k))

    def scores(self, q, q_docs, q_pos, k, kv_docs, k_pos):
        """fp32 scores [B, K, G, Q, S] and the mask [B, 1, 1, Q, S]."""
        s = jnp.einsum("BKGQD,BKSD->BKGQS", q, k, preferred_element_type=jnp.float32)
        visible = (k_pos[None, :] <= q_pos[:, None])[None] & (q_docs[:, :, None] == kv_docs[:, None, :])
        return s * self.scale, visible[:, None, None]

    def visible_key_blocks(self, q_index):
        """Key blocks q block `q_index` can see: [0, this)."""
        last_query = self.q_offset + (q_index + 1) * self.block_q - 1
        return jnp.clip(last_query // self.block_k + 1, 0, self.num_k)

    def first_query_block(self, k_index):
        """The first query block that can see key block `k_index`."""
        return jnp.clip((k_index * self.block_k - self.q_offset) // self.block_q, 0, self.num_q)

    def ungroup(self, x):
        """[num_q, B, K, G, Q, ...] -> [B, Tq, N, ...] without the padding."""
        x = jnp.moveaxis(x, 4, 1)  # [num_q, Q, B, K, G, ...]
        x = jnp.moveaxis(x, 2, 0)  # [B, num_q, Q, K, G, ...]
        shape = x.shape
        x = x.reshape(shape[0], shape[1] * shape[2], self.heads, *shape[5:])
        return x[:, : self.q_len]

    def group(self, x):
        """[B, Tq, N, ...] -> [num_q, B, K, G, Q, ...] (padding with zeros)."""
        x = _pad_time(x, self.pad_q)
        batch = x.shape[0]
        x = x.reshape(batch, self.num_q, self.block_q, self.heads // self.groups, self.groups,
                      *x.shape[3:])
        return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 4)


def _forward(q, k, v, q_docs, kv_docs, q_offset, scale, block_q, block_k):
    blocks = _Blocks(q, k, v, q_docs, kv_docs, q_offset, scale, block_q, block_k)
    batch, kv_heads, groups, dv = q.shape[0], k.shape[2], blocks.groups, v.shape[3]

    def query_block(q_index):
        qb, q_docs_b, q_pos = blocks.query_block(q_index)

        def key_step(k_index, carry):
            top, total, acc = carry
            kb, vb, kv_docs_b, k_pos = blocks.key_block(k_index)
            s, visible = blocks.scores(qb, q_docs_b, q_pos, kb, kv_docs_b, k_pos)
            s = jnp.where(visible, s, _MASKED)
            new_top = jnp.maximum(top, jnp.max(s, axis=-1))
            p = jnp.where(visible, jnp.exp(s - new_top[..., None]), 0.0)
            rescale = jnp.exp(top - new_top)
            total = total * rescale + jnp.sum(p, axis=-1)
            acc = acc * rescale[..., None] + jnp.einsum(
                "BKGQS,BKSD->BKGQD", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
            return new_top, total, acc

        shape = (batch, kv_heads, groups, block_q)
        init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (dv,), jnp.float32))
        top, total, acc = jax.lax.fori_loop(0, blocks.visible_key_blocks(q_index), key_step, init)
        safe_total = jnp.where(total > 0, total, 1.0)
        return acc / safe_total[..., None], top + jnp.log(safe_total)

    out, lse = jax.lax.map(query_block, jnp.arange(blocks.num_q))  # [num_q, B, K, G, Q, ...]
    return blocks.ungroup(out).astype(v.dtype), lse


def _backward(q, k, v, q_docs, kv_docs, q_offset, out, lse, grad_out, scale, block_q, block_k):
    """FlashAttention-2's backward over tiles. The products take their operands in the compute
    dtype (bf16 in training: the MXU/tensor-core rate, no fp32 copies of q, k, v or dO) and
    accumulate in fp32; the softmax and its gradient (p, dS) are formed in fp32 and rounded
    once, to the compute dtype, as the next product's operand — as the fused kernels do."""
    blocks = _Blocks(q, k, v, q_docs, kv_docs, q_offset, scale, block_q, block_k)
    compute = q.dtype
    f32 = jnp.float32
    grad_out_blocks = blocks.group(grad_out.astype(v.dtype))  # [num_q, B, K, G, Q, Dv]
    # D_i = dO_i . O_i, the softmax-gradient correction per query (fp32).
    delta = jnp.einsum("...D,...D->...", grad_out_blocks, blocks.group(out.astype(v.dtype)),
                       preferred_element_type=f32)
    grad_q = jnp.zeros(blocks.q.shape, f32)  # [B, K, G, Tq (padded), D]

    def key_block(grad_q, k_index):
        kb, vb, kv_docs_b, k_pos = blocks.key_block(k_index)

        def query_step(q_index, carry):
            grad_q, grad_k, grad_v = carry
            qb, q_docs_b, q_pos = blocks.query_block(q_index)
            s, visible = blocks.scores(qb, q_docs_b, q_pos, kb, kv_docs_b, k_pos)
            p = jnp.where(visible, jnp.exp(s - lse[q_index][..., None]), 0.0)  # [B, K, G, Q, S]
            g_out = grad_out_blocks[q_index]  # [B, K, G, Q, Dv]
            grad_v += jnp.einsum("BKGQS,BKGQD->BKSD", p.astype(v.dtype), g_out,
                                 preferred_element_type=f32)
            grad_p = jnp.einsum("BKGQD,BKSD->BKGQS", g_out, vb, preferred_element_type=f32)
            grad_s = (p * (grad_p - delta[q_index][..., None]) * blocks.scale).astype(compute)
            grad_k += jnp.einsum("BKGQS,BKGQD->BKSD", grad_s, qb, preferred_element_type=f32)
            update = jnp.einsum("BKGQS,BKSD->BKGQD", grad_s, kb, preferred_element_type=f32)
            start = q_index * block_q
            grad_q = jax.lax.dynamic_update_slice_in_dim(
                grad_q, _slice(grad_q, start, block_q, axis=3) + update, start, axis=3)
            return grad_q, grad_k, grad_v

        init = (grad_q, jnp.zeros(kb.shape, f32), jnp.zeros(vb.shape, f32))
        grad_q, grad_k, grad_v = jax.lax.fori_loop(
            blocks.first_query_block(k_index), blocks.num_q, query_step, init)
        return grad_q, (grad_k, grad_v)

    grad_q, (grad_k, grad_v) = jax.lax.scan(key_block, grad_q, jnp.arange(blocks.num_k))
    grad_q = grad_q[:, :, :, : blocks.q_len].transpose(0, 3, 1, 2, 4).reshape(q.shape)
    # [num_k, B, K, S, D] -> [B, Tk, K, D]
    unblock = lambda x: x.transpose(1, 0, 3, 2, 4).reshape(  # noqa: E731
        x.shape[1], -1, x.shape[2], x.shape[4])[:, : blocks.k_len]
    return grad_q.astype(q.dtype), unblock(grad_k).astype(k.dtype), unblock(grad_v).astype(v.dtype)


def _pad_time(x, pad, value=0):
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _slice(x, start, size, axis=1):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)
