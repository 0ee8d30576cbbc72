"""The gated delta rule as Pallas kernels, with a custom VJP that recomputes inside each chunk.

Forward: `inverse` (A = (I + L)^-1 per chunk, stored) -> `prepare` (U, W) -> `state_pass`
(sequential over chunks; keeps one state per chunk) -> `output`. Backward: `prepare` again
from the stored A -> `local_dv` -> `state_pass_backward` (sequential, reverse) ->
`output_backward` and `wy_backward` (both chunk-parallel). Stored beyond the inputs: A
(C values per token and value head) and one state per chunk.

q and k are L2-normalised (and q scaled by dk^-1/2) here, once, before the kernels, and that
normalisation's gradient is XLA's autodiff, outside the sequential loops. Decays and document
masks are per-token vectors computed here by XLA (cheap, elementwise), and the custom VJP is
taken with respect to them, so the chain rule back to g runs in XLA too:
    gamma = in-chunk cumulative sum of g,
    start = e^gamma on tokens in the document the chunk started in (else 0),
    end   = e^(gamma_last - gamma) on tokens in the chunk's last document (else 0).
Value heads are summed into their key head's dq, dk here (the kernels write one per value
head, so that no kernel loops over heads).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from qnext_jax.ops.chunked_delta import backward_kernels, kernels
from qnext_jax.ops.chunked_delta.chunk_math import l2_normalize
from qnext_jax.ops.chunked_delta.kernels import BACKENDS, KernelConfig
from qnext_jax.ops.chunked_delta.layout import chunk_decays, pad_to_chunks
from qnext_jax.ops.platform import target_platform

F32 = jnp.float32
log = logging.getLogger(__name__)


def default_backend() -> str:
    """The kernel backend for the platform jax computes on: Mosaic on TPU, Triton on GPU,
    interpret mode elsewhere (CPU)."""
    return {"tpu": "mosaic", "gpu": "triton"}.get(target_platform(), "interpret")


def delta_rule_pallas(
    q, k, v, g, beta, docs, initial_state, *, chunk_size=64, backend=None, value_block=None,
    normalize_qk=False,
):
    """Same contract as `delta_rule_chunked`, except q, k, v keep their dtype (bf16 or fp32):
    it becomes the matmul operand dtype; state and accumulation stay fp32. With
    `normalize_qk`, q and k are L2-normalised (q scaled by dk^-1/2) in fp32 first."""
    length, key_dim, value_dim = q.shape[1], q.shape[3], v.shape[3]
    cfg, inputs = kernel_inputs(q, k, v, g, beta, docs, initial_state, chunk_size=chunk_size,
                                backend=backend, value_block=value_block,
                                normalize_qk=normalize_qk)
    out, final_state = _core(cfg, *inputs)
    if not cfg.native_layout:
        out = jnp.swapaxes(out, 1, 2)
    return out[:, :length, :, :value_dim], final_state[..., :key_dim, :value_dim]


def kernel_inputs(q, k, v, g, beta, docs, initial_state, *, chunk_size=64, backend=None,
                  value_block=None, normalize_qk=False):
    """(KernelConfig, (q, k, v, beta, gamma, start, end, docs, initial_state)) as the kernels
    take them: normalised, padded to kernel head sizes and whole chunks, in the backend's
    layout, with the per-token decays. (Also what benchmarks time the kernels on.)"""
    backend = backend or default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"pallas backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"pallas chunk_size must be a power of two >= 16, got {chunk_size}")
    key_heads, key_dim = q.shape[2:]
    value_heads, value_dim = v.shape[2:]
    compute_dtype = jnp.bfloat16 if v.dtype == jnp.bfloat16 else F32
    if value_block is None:  # the sequential kernels' dv tile: fp32 tiles take twice the room
        value_block = 64 if compute_dtype == jnp.bfloat16 else 32
    if normalize_qk:
        q = l2_normalize(q, key_dim ** -0.5).astype(compute_dtype)
        k = l2_normalize(k).astype(compute_dtype)
    # Kernels hold whole [chunk, dv] and [dk, dv] tiles, which Triton takes only in powers of
    # two: pad dv (and dk) to the next one, then tile dv by the value block.
    padded_key_dim, padded_value_dim = _kernel_dim(key_dim), _kernel_dim(value_dim)
    if (padded_key_dim, padded_value_dim) != (key_dim, value_dim):
        q, k, v, initial_state = _pad_head_dims(
            q, k, v, initial_state, padded_key_dim, padded_value_dim)
    cfg = KernelConfig(
        chunk=chunk_size, group=value_heads // key_heads, compute_dtype=compute_dtype,
        backend=backend, value_block=min(value_block, padded_value_dim),
    )

    q, k, v, g, beta, docs = pad_to_chunks(q, k, v, g, beta, docs, chunk_size)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, T, H, ...] -> [B, H, T, ...]
    to_kernel = (lambda x: x) if cfg.native_layout else heads_first
    qh, kh, vh = (to_kernel(x).astype(compute_dtype) for x in (q, k, v))
    batch, padded = docs.shape
    gamma, start, end = (
        x.reshape(batch, value_heads, padded)
        for x in chunk_decays(
            heads_first(g.astype(F32)).reshape(batch, value_heads, -1, chunk_size),
            docs.reshape(batch, 1, -1, chunk_size),
        )
    )
    return cfg, (qh, kh, vh, heads_first(beta.astype(F32)), gamma, start, end,
                 docs.astype(jnp.int32), initial_state.astype(F32))


def _kernel_dim(size: int) -> int:
    """The head size the kernels take: a power of two (Triton's block shapes) of at least 16
    (the smallest tensor-core product)."""
    return max(16, 1 << (size - 1).bit_length())


def _pad_head_dims(q, k, v, initial_state, key_dim, value_dim):
    """Zero-pads the key and value head dims to kernel sizes. Exact: every value column of the
    state evolves on its own (a zero column of v stays a zero column of S and of o), and zero
    key components add nothing to k^T S, q^T S or k^T k, so the padded rows of S stay zero.
    (q and k are already normalised: the padding does not change their norms.)"""
    log.info("gated delta rule: head dims dk=%d, dv=%d padded to %d, %d for the Pallas kernels",
             q.shape[-1], v.shape[-1], key_dim, value_dim)
    pad = lambda x, size: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])
    q, k, v = pad(q, key_dim), pad(k, key_dim), pad(v, value_dim)
    initial_state = jnp.pad(initial_state, [(0, 0), (0, 0), (0, key_dim - initial_state.shape[2]),
                                            (0, value_dim - initial_state.shape[3])])
    return q, k, v, initial_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg, q, k, v, beta, gamma, start, end, docs, initial_state):
    out, final_state, _ = _forward(cfg, q, k, v, beta, gamma, start, end, docs, initial_state)
    return out, final_state


def _forward(cfg, q, k, v, beta, gamma, start, end, docs, initial_state):
    transform = kernels.inverse(cfg, k, beta, gamma, docs)
    u, w = kernels.prepare(cfg, transform, k, v, beta, start)
    v_new, states, final_state = kernels.state_pass(cfg, u, w, k, start, end, initial_state)
    out = kernels.output(cfg, q, k, states, v_new, gamma, start, docs, v.dtype)
    return out, final_state, (states, transform)


def _core_fwd(cfg, q, k, v, beta, gamma, start, end, docs, initial_state):
    out, final_state, saved = _forward(cfg, q, k, v, beta, gamma, start, end, docs, initial_state)
    return (out, final_state), (q, k, v, beta, gamma, start, end, docs, saved)


def _core_bwd(cfg, residuals, cotangents):
    q, k, v, beta, gamma, start, end, docs, (states, transform) = residuals
    d_out, d_final = cotangents
    d_out = d_out.astype(cfg.compute_dtype)
    u, w = kernels.prepare(cfg, transform, k, v, beta, start)
    d_v_local = backward_kernels.local_dv(cfg, q, k, d_out, gamma, docs)
    d_v_new, d_states_end, d_initial = backward_kernels.state_pass_backward(
        cfg, d_final.astype(F32), d_out, d_v_local, w, q, k, start, end)
    dq, dk_out, d_start_out, d_end, dg_col_out, dg_row_out = backward_kernels.output_backward(
        cfg, q, k, u, w, states, d_states_end, d_out, gamma, start, end, docs)
    dk_wy, dv, d_beta, d_start_wy, dg_col_wy, dg_row_wy = backward_kernels.wy_backward(
        cfg, transform, k, v, beta, gamma, start, docs, states, d_v_new)
    flat = lambda x: x.reshape(gamma.shape)  # noqa: E731  [B, Hv, N, C, 1] or [.., 1, C]
    d_gamma = flat(dg_col_out) + flat(dg_row_out) + flat(dg_col_wy) + flat(dg_row_wy)
    return (_per_key_head(cfg, dq).astype(q.dtype), _per_key_head(cfg, dk_out + dk_wy).astype(k.dtype),
            dv.astype(v.dtype), flat(d_beta), d_gamma, flat(d_start_out) + flat(d_start_wy),
            flat(d_end), None, d_initial)


def _per_key_head(cfg, x):
    """Sums a per-value-head gradient over each key head's `group` value heads."""
    if cfg.native_layout:  # [B, T, Hv, d] -> [B, T, Hk, d]
        batch, length, heads, dim = x.shape
        return x.reshape(batch, length, heads // cfg.group, cfg.group, dim).sum(axis=3)
    batch, heads, length, dim = x.shape  # [B, Hv, T, d] -> [B, Hk, T, d]
    return x.reshape(batch, heads // cfg.group, cfg.group, length, dim).sum(axis=2)


_core.defvjp(_core_fwd, _core_bwd)
