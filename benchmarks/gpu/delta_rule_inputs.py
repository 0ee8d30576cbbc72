"""The delta-rule benchmarks' inputs and work count, shared by every script that times the rule
(benchmarks/gated_delta_rule.py, gpu/device_check.py, gpu/fla_peer.py), so that our rows and the
peers' see the same numbers. NumPy only: the FLA peer runs without jax."""

import numpy as np


def make_inputs(shape, seed=0):
    """(q, k, v, g, beta) fp32 NumPy arrays for shape (batch, length, key heads, value heads,
    head dim): normal q, k, v; log-decays g in [-1, -0.01]; beta in [0, 1]."""
    batch, length, key_heads, value_heads, dim = shape
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, batch, length, key_heads, dim), dtype=np.float32)
    v = rng.standard_normal((batch, length, value_heads, dim), dtype=np.float32)
    g = -rng.uniform(0.01, 1.0, size=(batch, length, value_heads)).astype(np.float32)
    beta = rng.uniform(0, 1, size=(batch, length, value_heads)).astype(np.float32)
    return q, k, v, g, beta


def chunked_flops(batch, length, key_heads, value_heads, dim, chunk=64):
    """(forward, backward) FLOPs of the chunked algorithm: 2 per multiply-add of its matmuls,
    the triangular inverse counted as C^3 / 3 multiply-adds."""
    c, d, group = chunk, dim, value_heads // key_heads
    forward = (
        2 * c * c * d / group  # K K^T and Q K^T, shared by the value heads of a key head
        + c ** 3 / 3  # (I + L)^-1
        + 2 * c * c * d  # U = A (beta V), W = A (beta K)
        + 3 * c * d * d  # W S, K^T V_new, Q S
        + c * c * d  # (Q K^T * decay) V_new
    )
    backward = 9 * c * c * d + 6 * c * d * d + 2 * c ** 3
    per_chunk_head = 2 * batch * value_heads * (-(-length // c))
    return forward * per_chunk_head, backward * per_chunk_head
