"""Blockwise attention against XLA's full-matrix attention (jax.nn.dot_product_attention with an
explicit [T, T] mask) and float64 NumPy: packed rows with a reused segment id, GQA, blocks that
do not divide the length, queries offset into a longer key sequence, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnext_jax.ops.blockwise_attention import blockwise_attention
from qnext_jax.ops.segments import document_index

B, T, N, K, D = 2, 40, 4, 2, 8


def xla_attention(q, k, v, q_docs, kv_docs, q_offset, scale):
    q_pos = q_offset + jnp.arange(q.shape[1])
    mask = (jnp.arange(k.shape[1])[None, :] <= q_pos[:, None])[None]
    mask = mask & (q_docs[:, :, None] == kv_docs[:, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)


def numpy_attention(q, k, v, q_docs, kv_docs, q_offset, scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = np.repeat(k, q.shape[2] // k.shape[2], 2), np.repeat(v, q.shape[2] // k.shape[2], 2)
    s = np.einsum("bqnd,bsnd->bnqs", q, k) * scale
    q_pos = q_offset + np.arange(q.shape[1])
    mask = (np.arange(k.shape[1])[None, :] <= q_pos[:, None])[None]
    mask = mask & (np.asarray(q_docs)[:, :, None] == np.asarray(kv_docs)[:, None, :])
    s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqs,bsnd->bqnd", p, v)


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
    # Row 0 reuses id 1 for a third document (ids 1, 2, 1); row 1 is one document.
    segments = np.ones((B, T), np.int32)
    segments[0, 13:27] = 2
    docs = document_index(jnp.asarray(segments))
    return q, k, v, docs, jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.float32)


@pytest.mark.parametrize("block_q, block_k", [(8, 8), (16, 8), (7, 12), (64, 64)])
def test_values_and_gradients_equal_xla_attention(operands, block_q, block_k):
    q, k, v, docs, grad_out = operands
    scale = D ** -0.5

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) * grad_out)

    ours = lambda q, k, v: blockwise_attention(  # noqa: E731
        q, k, v, q_docs=docs, kv_docs=docs, scale=scale, block_q=block_q, block_k=block_k)
    xla = lambda q, k, v: xla_attention(q, k, v, docs, docs, 0, scale)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), numpy_attention(q, k, v, docs, docs, 0, scale),
                               rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"grad {name}")


def test_bf16_values_and_gradients_against_fp32_xla(operands):
    """bf16 operands (what training computes in): values and gradients near the fp32 XLA
    attention of the same bf16-rounded inputs, and every product of the backward reads bf16
    operands (fp32 accumulation), none an fp32 copy of q, k, v or dO."""
    q, k, v, docs, grad_out = operands
    scale, start = D ** -0.5, 8
    q16, k16, v16, g16 = (x.astype(jnp.bfloat16) for x in (q, k, v, grad_out))
    local = slice(start, start + 24)

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * g16[:, local].astype(jnp.float32))

    ours = lambda q, k, v: blockwise_attention(  # noqa: E731
        q, k, v, q_docs=docs[:, local], kv_docs=docs, q_offset=start, scale=scale, block_q=8,
        block_k=8)
    xla = lambda q, k, v: xla_attention(q, k, v, docs[:, local], docs, start, scale)  # noqa: E731
    wide = [x.astype(jnp.float32) for x in (q16[:, local], k16, v16)]
    got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q16[:, local], k16, v16)
    expected = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(*wide)
    np.testing.assert_allclose(ours(q16[:, local], k16, v16).astype(jnp.float32),
                               numpy_attention(*wide, docs[:, local], docs, start, scale),
                               rtol=2e-2, atol=2e-2)
    for name, a, b in zip("qkv", got, expected):
        assert a.dtype == jnp.bfloat16
        scale_of = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=0, atol=3e-2 * scale_of,
                                   err_msg=f"grad {name}")

    backward = jax.make_jaxpr(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(
        q16[:, local], k16, v16)
    dots = []

    def collect(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append((tuple(str(x.aval.dtype) for x in eqn.invars),
                             str(eqn.params.get("preferred_element_type"))))
            for value in eqn.params.values():
                for inner in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(inner, "jaxpr") and hasattr(inner.jaxpr, "eqns"):
                        collect(inner.jaxpr)
                    elif hasattr(inner, "eqns"):
                        collect(inner)

    collect(backward.jaxpr)
    assert len(dots) >= 7  # forward: 2 products; backward: 5
    assert all(operands == ("bfloat16", "bfloat16") for operands, _ in dots), dots
    assert all(accumulate == "float32" for _, accumulate in dots), dots


def test_queries_offset_into_a_longer_key_sequence(operands):
    """A device holding queries 16..31 of the row against all keys: the rows of the full run."""
    q, k, v, docs, grad_out = operands
    scale, start = D ** -0.5, 16
    local = slice(start, start + 16)

    def ours(q_local, k, v):
        return blockwise_attention(q_local, k, v, q_docs=docs[:, local], kv_docs=docs,
                                   q_offset=start, scale=scale, block_q=8, block_k=8)

    full = blockwise_attention(q, k, v, q_docs=docs, kv_docs=docs, scale=scale, block_q=8,
                               block_k=8)
    np.testing.assert_allclose(ours(q[:, local], k, v), full[:, local], rtol=1e-6, atol=1e-6)
    xla = lambda q_local, k, v: xla_attention(q_local, k, v, docs[:, local], docs, start, scale)  # noqa: E731
    loss = lambda fn, *a: jnp.sum(fn(*a) * grad_out[:, local])  # noqa: E731
    got = jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2))(q[:, local], k, v)
    expected = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q[:, local], k, v)
    for name, a, b in zip("qkv", got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"grad {name}")


def test_memory_grows_linearly_with_length():
    """The compiled forward + backward's temporaries at 4x the length: ~4x, not ~16x."""
    def temp_bytes(length):
        shape = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)

        def loss(q, k, v):
            return jnp.sum(blockwise_attention(q, k, v, scale=0.25, block_q=64, block_k=64))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(2048) < 6 * temp_bytes(512)


def test_lowers_for_cuda_forward_and_backward():
    """The GPU path (XLA, no custom kernel): the forward and backward lower for CUDA."""
    from jax import export

    shape = jax.ShapeDtypeStruct((1, 1024, 16, 256), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 1024, 2, 256), jnp.bfloat16)

    def train(q, k, v):
        return jax.grad(lambda *a: jnp.sum(blockwise_attention(*a, scale=0.0625).astype(
            jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    exported = export.export(jax.jit(train), platforms=["cuda"])(shape, kv, kv)
    assert [a.shape for a in exported.out_avals] == [shape.shape, kv.shape, kv.shape]
    assert "stablehlo.while" in exported.mlir_module()  # blocks, not one [T, T] product
