"""The chunked gated delta rule in plain XLA: the Pallas kernels' algebra, batched over chunks.

Same chunk algebra (`chunk_math`) and the same hand-written VJP as the kernels, so the two
implementations differ only in how work is scheduled: here every chunk-parallel step is one
batched einsum over [N, B, Hk, r, C, ...] and the two sequential passes are `lax.scan`s over
the leading chunk axis (chunk-major from the start, so the scans need no transposes). Heads stay grouped as [Hk, r] (value head h = key head h // r, sub-head h % r) so
K K^T and Q K^T are computed once per key head. The inverse (I + L)^-1 uses sliced blocks,
which does a twentieth of the masked version's work; that matters on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qnext_jax.ops.chunked_delta import chunk_math as cm
from qnext_jax.ops.chunked_delta.layout import chunk_decays, pad_to_chunks

F32 = jnp.float32
NUMERICS = cm.Numerics(F32, inverse=cm.unit_lower_inverse_blocked)


def delta_rule_chunked(q, k, v, g, beta, docs, initial_state, *, chunk_size=64):
    """All inputs fp32; docs [B, T] monotone document indices. Returns (o, final_state fp32)."""
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
    batch, length, key_heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2:]
    group = value_heads // key_heads
    q, k, v, g, beta, docs = pad_to_chunks(q, k, v, g, beta, docs, chunk_size)
    num_chunks = docs.shape[1] // chunk_size

    def grouped(x, heads, sub, dim):  # [B, T, heads*sub, dim] -> [N, B, heads, sub, C, dim]
        x = x.reshape(batch, num_chunks, chunk_size, heads, sub, dim)
        return x.transpose(1, 0, 3, 4, 2, 5)

    def per_token(x):  # [B, T, Hv] -> [N, B, Hk, r, C]
        x = x.reshape(batch, num_chunks, chunk_size, key_heads, group)
        return x.transpose(1, 0, 3, 4, 2).astype(F32)

    chunk_docs = docs.reshape(batch, num_chunks, chunk_size).transpose(1, 0, 2)[:, :, None, None]
    gamma, start, end = chunk_decays(per_token(g), chunk_docs, chunk_axis=0)
    state = initial_state.astype(F32).reshape(batch, key_heads, group, key_dim, value_dim)
    out, final_state = _core(
        grouped(q, key_heads, 1, key_dim), grouped(k, key_heads, 1, key_dim),
        grouped(v, key_heads, group, value_dim), per_token(beta), gamma, start, end,
        chunk_docs, state,
    )
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(batch, -1, value_heads, value_dim)
    return out[:, :length], final_state.reshape(batch, value_heads, key_dim, value_dim)


def _col(x):
    return x[..., :, None]


def _row(x):
    return x[..., None, :]


def _mask(docs):
    return cm.causal_same_doc(_col(docs), _row(docs))


def _wy(k, beta, gamma, docs):
    return cm.wy_transform(k, _col(beta), _col(gamma), _row(gamma), _mask(docs), NUMERICS)


@jax.custom_vjp
def _core(q, k, v, beta, gamma, start, end, docs, state):
    out, final_state, _ = _forward(q, k, v, beta, gamma, start, end, docs, state)
    return out, final_state


def _forward(q, k, v, beta, gamma, start, end, docs, state):
    wy = _wy(k, beta, gamma, docs)
    transform, decay, _ = wy
    u, w = cm.prepare(k, v, _col(beta), _col(start), transform, NUMERICS)

    def step(state, chunk):
        u, w, k, start, end = chunk
        v_new, next_state = cm.state_step(state, u, w, k, _col(start), _col(end), NUMERICS)
        return next_state, (v_new, state)

    final_state, (v_new, states) = jax.lax.scan(step, state, (u, w, k, start, end))
    q_keys = cm.matmul(q, k, NUMERICS, transpose_b=True)
    out = cm.output(q, states, v_new, _col(start), q_keys * decay, NUMERICS)
    return out, final_state, (states, v_new, wy, w, q_keys)


def _core_fwd(q, k, v, beta, gamma, start, end, docs, state):
    out, final_state, saved = _forward(q, k, v, beta, gamma, start, end, docs, state)
    return (out, final_state), (q, k, v, beta, gamma, start, end, docs, saved)


def _core_bwd(residuals, cotangents):
    # Unlike the kernels, keep the chunk matrices and V_new from the forward: on CPU
    # recomputing them costs more time than their memory (O(C) floats per token, head) is worth.
    q, k, v, beta, gamma, start, end, docs, (states, v_new, wy, w, q_keys) = residuals
    d_out, d_final = cotangents
    scores = q_keys * wy[1]
    # The intra-chunk part of dV_new for every chunk at once, outside the sequential scan.
    d_v_local = cm.matmul(scores, d_out, NUMERICS, transpose_a=True)

    def step(d_state, chunk):
        d_out, d_v_local, w, k, q, start, end = chunk
        d_v_new, d_prev = cm.state_step_backward(
            d_state, d_out, d_v_local, w, k, q, _col(start), _col(end), NUMERICS
        )
        return d_prev, (d_v_new, d_state)

    chunks = (d_out, d_v_local, w, k, q, start, end)
    d_initial, (d_v_new, d_states_end) = jax.lax.scan(step, d_final, chunks, reverse=True)
    dq, dk, dv, d_beta, d_start, d_end, d_gamma_col, d_gamma_row = cm.chunk_backward(
        q, k, v, _col(beta), _row(beta), _col(start), _col(end), _col(gamma), _row(gamma),
        _col(docs), _row(docs), states, d_states_end, d_out, d_v_new, v_new, wy, q_keys,
        NUMERICS,
    )
    per_key_head = lambda x: jnp.sum(x, axis=3, keepdims=True)  # sum over the r value heads
    d_gamma = d_gamma_col[..., 0] + d_gamma_row[..., 0, :]
    return (per_key_head(dq), per_key_head(dk), dv, d_beta[..., 0], d_gamma, d_start[..., 0],
            d_end[..., 0], None, d_initial)


_core.defvjp(_core_fwd, _core_bwd)
