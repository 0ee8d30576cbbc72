"""The gated delta rule: one entry point, several implementations.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T q_t

per (batch, value head), with the state S in fp32 (spec section 2.3). Value head h reads key
head h // (Hv / Hk) (repeat-interleave grouping); the implementations map heads rather than
materialise repeated q and k where they can.
"""

from __future__ import annotations

import jax.numpy as jnp

from qnext_jax.ops.chunked_delta.chunk_math import l2_normalize
from qnext_jax.ops.chunked_delta.pallas import default_backend, delta_rule_pallas
from qnext_jax.ops.chunked_delta.xla import delta_rule_chunked
from qnext_jax.ops.delta_rule_reference import delta_rule_reference
from qnext_jax.ops.segments import document_index

IMPLEMENTATIONS = ("auto", "reference", "chunked", "pallas")


def gated_delta_rule(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    g: jnp.ndarray,
    beta: jnp.ndarray,
    *,
    segment_ids: jnp.ndarray | None = None,
    initial_state: jnp.ndarray | None = None,
    impl: str = "auto",
    normalize_qk: bool = False,
    chunk_size: int | None = None,
    pallas_backend: str | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Runs the gated delta rule over a batch of (possibly packed) sequences.

    q, k: [B, T, Hk, dk], already L2-normalised and q already scaled by dk^-1/2, unless
        `normalize_qk` asks this function to do both (in fp32).
    v: [B, T, Hv, dv] with Hv a multiple of Hk.  g (log-decay, <= 0), beta: [B, T, Hv].
    segment_ids: [B, T]; the state restarts from zero where the id changes.
    initial_state: [B, Hv, dk, dv], the state before the first token of each row.
    impl: "auto" is "pallas" on GPU and TPU and "chunked" elsewhere (on CPU the kernels would
        run in Pallas' interpret mode, which is for testing).
    chunk_size: tokens per chunk (power of two); None picks 64, or 32 for "chunked" with
        dk <= 64, where the C^2 d and C d^2 terms of the chunked work balance at C = d / 2.
    pallas_backend: "mosaic", "triton", "interpret" or "interpret_loop"; None follows the
        platform traced for (ops.platform.target_platform).
    Returns (o [B, T, Hv, dv] in v's dtype, final_state [B, Hv, dk, dv] fp32).
    """
    _check_shapes(q, k, v, g, beta, segment_ids, initial_state)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"gated_delta_rule impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        impl = "pallas" if default_backend() in ("mosaic", "triton") else "chunked"
    if chunk_size is None:
        chunk_size = 32 if impl == "chunked" and q.shape[-1] <= 64 else 64
    batch, length = q.shape[:2]
    if segment_ids is None:
        docs = jnp.zeros((batch, length), jnp.int32)
    else:
        docs = document_index(segment_ids)
    if initial_state is None:
        initial_state = jnp.zeros((batch, v.shape[2], q.shape[3], v.shape[3]), jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)
    if impl == "pallas":
        out, state = delta_rule_pallas(
            q, k, v, f32(g), beta, docs, f32(initial_state), chunk_size=chunk_size,
            backend=pallas_backend, normalize_qk=normalize_qk,
        )
        return out.astype(v.dtype), state
    if normalize_qk:
        q = l2_normalize(q, q.shape[-1] ** -0.5)
        k = l2_normalize(k)
    args = (f32(q), f32(k), f32(v), f32(g), f32(beta), docs, f32(initial_state))
    if impl == "reference":
        out, state = delta_rule_reference(*args)
    else:
        out, state = delta_rule_chunked(*args, chunk_size=chunk_size)
    return out.astype(v.dtype), state


def _check_shapes(q, k, v, g, beta, segment_ids, initial_state) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, Hk, dk]; got {q.shape} and {k.shape}")
    batch, length, key_heads, key_dim = q.shape
    if v.ndim != 4 or v.shape[:2] != (batch, length):
        raise ValueError(f"v must be [B={batch}, T={length}, Hv, dv]; got {v.shape}")
    value_heads, value_dim = v.shape[2:]
    if value_heads % key_heads:
        raise ValueError(f"value heads ({value_heads}) must be a multiple of key heads ({key_heads})")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (batch, length, value_heads):
            raise ValueError(f"{name} must be [B, T, Hv] = {(batch, length, value_heads)}; got {x.shape}")
    if segment_ids is not None and segment_ids.shape != (batch, length):
        raise ValueError(f"segment_ids must be [B, T] = {(batch, length)}; got {segment_ids.shape}")
    expected_state = (batch, value_heads, key_dim, value_dim)
    if initial_state is not None and initial_state.shape != expected_state:
        raise ValueError(f"initial_state must be {expected_state}; got {initial_state.shape}")
