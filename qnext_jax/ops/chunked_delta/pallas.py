"""The gated delta rule as Pallas kernels, with a custom VJP that recomputes inside each chunk.

Forward: `prepare` (U, W per chunk, parallel) -> `state_pass` (sequential over chunks; keeps
one state per chunk) -> `output` (parallel). Backward: `prepare` again for W ->
`state_pass_backward` (sequential, reverse) -> `chunk_backward` (parallel; recomputes A, U, W,
V_new from the stored chunk-start state). Nothing per token is stored beyond the inputs.

Decays and document masks are per-token vectors computed here by XLA (cheap, elementwise), and
the custom VJP is taken with respect to them, so the chain rule back to g runs in XLA too:
    gamma = in-chunk cumulative sum of g,
    start = e^gamma on tokens in the document the chunk started in (else 0),
    end   = e^(gamma_last - gamma) on tokens in the chunk's last document (else 0).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from qnext_jax.ops.chunked_delta import kernels
from qnext_jax.ops.chunked_delta.chunk_math import l2_normalize
from qnext_jax.ops.chunked_delta.kernels import BACKENDS, KernelConfig
from qnext_jax.ops.chunked_delta.layout import chunk_decays, pad_to_chunks

F32 = jnp.float32
log = logging.getLogger(__name__)


def default_backend() -> str:
    """The kernel backend for the platform jax computes on: Mosaic on TPU, Triton on GPU,
    interpret mode elsewhere (CPU)."""
    platform = jax.default_backend()
    return {"tpu": "mosaic", "gpu": "triton", "cuda": "triton", "rocm": "triton"}.get(
        platform, "interpret"
    )


def delta_rule_pallas(
    q, k, v, g, beta, docs, initial_state, *, chunk_size=64, backend=None, value_block=64,
    normalize_qk=False,
):
    """Same contract as `delta_rule_chunked`, except q, k, v keep their dtype (bf16 or fp32):
    it becomes the matmul operand dtype; state and accumulation stay fp32. With
    `normalize_qk` the kernels L2-normalise q and k (and scale q by dk^-1/2) as they load them,
    and apply the normalisation's gradient in the backward kernel."""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"pallas backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"pallas chunk_size must be a power of two >= 16, got {chunk_size}")
    batch, length, key_heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2:]
    compute_dtype = jnp.bfloat16 if v.dtype == jnp.bfloat16 else F32
    # Kernels hold whole [chunk, dv] and [dk, dv] tiles, which Triton takes only in powers of
    # two: pad dv (and dk) to the next one, then tile dv by the value block.
    padded_key_dim, padded_value_dim = _kernel_dim(key_dim), _kernel_dim(value_dim)
    value_block = min(value_block, padded_value_dim)
    if (padded_key_dim, padded_value_dim) != (key_dim, value_dim):
        q, k, v, initial_state, normalize_qk = _pad_head_dims(
            q, k, v, initial_state, normalize_qk, padded_key_dim, padded_value_dim)
    cfg = KernelConfig(
        chunk=chunk_size, group=value_heads // key_heads, compute_dtype=compute_dtype,
        backend=backend, value_block=value_block, normalize_qk=normalize_qk,
    )

    q, k, v, g, beta, docs = pad_to_chunks(q, k, v, g, beta, docs, chunk_size)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, H, ...] -> [B, H, T, ...]
    qh, kh, vh = (heads_first(x).astype(compute_dtype) for x in (q, k, v))
    batch, padded = docs.shape
    gamma, start, end = (
        x.reshape(batch, value_heads, padded)
        for x in chunk_decays(
            heads_first(g.astype(F32)).reshape(batch, value_heads, -1, chunk_size),
            docs.reshape(batch, 1, -1, chunk_size),
        )
    )
    out, final_state = _core(
        cfg, qh, kh, vh, heads_first(beta.astype(F32)), gamma, start, end,
        docs.astype(jnp.int32), initial_state.astype(F32),
    )
    return heads_first(out)[:, :length, :, :value_dim], final_state[..., :key_dim, :value_dim]


def _kernel_dim(size: int) -> int:
    """The head size the kernels take: a power of two (Triton's block shapes) of at least 16
    (the smallest tensor-core product)."""
    return max(16, 1 << (size - 1).bit_length())


def _pad_head_dims(q, k, v, initial_state, normalize_qk, key_dim, value_dim):
    """Zero-pads the key and value head dims to kernel sizes. Exact: every value column of the
    state evolves on its own (a zero column of v stays a zero column of S and of o), and zero
    key components add nothing to k^T S, q^T S or k^T k, so the padded rows of S stay zero.
    q and k are normalised here first, as the in-kernel normalisation would scale by the
    padded dk."""
    log.info("gated delta rule: head dims dk=%d, dv=%d padded to %d, %d for the Pallas kernels",
             q.shape[-1], v.shape[-1], key_dim, value_dim)
    if normalize_qk:
        q = l2_normalize(q.astype(F32), q.shape[-1] ** -0.5).astype(q.dtype)
        k = l2_normalize(k.astype(F32)).astype(k.dtype)
    pad = lambda x, size: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])
    q, k, v = pad(q, key_dim), pad(k, key_dim), pad(v, value_dim)
    initial_state = jnp.pad(initial_state, [(0, 0), (0, 0), (0, key_dim - initial_state.shape[2]),
                                            (0, value_dim - initial_state.shape[3])])
    return q, k, v, initial_state, False


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, beta, gamma, start, end, docs, initial_state):
    out, final_state, _ = _forward(cfg, q, k, v, beta, gamma, start, end, docs, initial_state)
    return out, final_state


def _forward(cfg, q, k, v, beta, gamma, start, end, docs, initial_state):
    u, w = kernels.prepare(cfg, k, v, beta, gamma, start, docs)
    v_new, states, final_state = kernels.state_pass(cfg, u, w, k, start, end, initial_state)
    out = kernels.output(cfg, q, k, states, v_new, gamma, start, docs, v.dtype)
    return out, final_state, states


def _core_fwd(cfg, q, k, v, beta, gamma, start, end, docs, initial_state):
    out, final_state, states = _forward(cfg, q, k, v, beta, gamma, start, end, docs, initial_state)
    return (out, final_state), (q, k, v, beta, gamma, start, end, docs, states)


def _core_bwd(cfg, residuals, cotangents):
    q, k, v, beta, gamma, start, end, docs, states = residuals
    d_out, d_final = cotangents
    _, w = kernels.prepare(cfg, k, v, beta, gamma, start, docs)
    d_v_new, d_states_end, d_initial = kernels.state_pass_backward(
        cfg, d_final.astype(F32), d_out.astype(cfg.compute_dtype), w, q, k, gamma, start, end, docs
    )
    dq, dk, dv, d_beta, d_start, d_end, d_gamma = kernels.chunk_backward(
        cfg, q, k, v, beta, gamma, start, end, docs, states, d_states_end,
        d_out.astype(cfg.compute_dtype), d_v_new,
    )
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_beta, d_gamma,
            d_start, d_end, None, d_initial)


_core.defvjp(_core_fwd, _core_bwd)
