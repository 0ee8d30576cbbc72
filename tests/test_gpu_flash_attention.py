"""The GPU flash attention path (ops/gpu_flash_attention.py): its document mask — a key range
per query — through tokamax's XLA implementation of the same op against float64 NumPy on packed
rows with a reused segment id, GQA, a context-parallel query shard, fp32 and bf16, values and
gradients; and tokamax's Mosaic GPU kernel compiled by XLA:GPU for an H100 (compile-only here:
the kernel needs a Hopper GPU to run, which the device check times)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("tokamax", reason="needs tokamax: pip install 'qnext_jax[aot]'")

from qnext_jax.ops.gpu_flash_attention import (  # noqa: E402
    document_starts, gpu_flash_attention, xla_reference_kernel,
)
from qnext_jax.ops.segments import document_index  # noqa: E402
from test_blockwise_attention import numpy_attention  # noqa: E402

B, T, N, K, D = 2, 48, 4, 2, 16


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32)
    # Row 0: ids 1, 2, 1 (a reused id is a third document), a 1-token document at 30; row 1 one.
    segments = np.ones((B, T), np.int32)
    segments[0, 11:24], segments[0, 30] = 2, 5
    return q, k, v, document_index(jnp.asarray(segments)), rng.normal(size=(B, T, N, D))


def test_document_starts_are_each_querys_first_key(operands):
    docs = np.asarray(operands[3])
    expected = [[int(np.argmax(row == d)) for d in row] for row in docs]
    np.testing.assert_array_equal(document_starts(jnp.asarray(docs), jnp.asarray(docs)), expected)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("start", [None, 16])
def test_document_ranges_equal_float64_attention(operands, dtype, start):
    """start: None for queries and keys the same tokens, else the queries are the shard of the
    row from `start` (their causal limit is their global position)."""
    q, k, v, docs, cotangent = operands
    local = slice(0, T) if start is None else slice(start, start + 16)
    offset = 0 if start is None else start
    q_local, q_docs = q[:, local], docs[:, local]
    cast = [x.astype(dtype) for x in (q_local, k, v)]
    wide = [np.asarray(x.astype(jnp.float32), np.float64) for x in cast]
    scale = D ** -0.5
    cotangent = jnp.asarray(cotangent[:, local], jnp.float32)

    def ours(q, k, v):
        return gpu_flash_attention(q, k, v, q_docs, docs, scale=scale, q_offset=start,
                                   kernel=xla_reference_kernel())

    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(ours(*cast).astype(jnp.float32),
                               numpy_attention(*wide, q_docs, docs, offset, scale),
                               rtol=tolerance, atol=tolerance)

    # Gradients against float64 finite differences of the NumPy attention along a direction.
    grads = jax.grad(lambda *a: jnp.sum(ours(*a).astype(jnp.float32) * cotangent),
                     argnums=(0, 1, 2))(*cast)
    rng = np.random.default_rng(4)
    for index, (name, grad) in enumerate(zip("qkv", grads)):
        direction = rng.normal(size=wide[index].shape)
        shifted = lambda eps: [w + eps * direction if i == index else w  # noqa: E731
                               for i, w in enumerate(wide)]
        objective = lambda eps: float(np.sum(numpy_attention(  # noqa: E731
            *shifted(eps), q_docs, docs, offset, scale) * np.asarray(cotangent)))
        numeric = (objective(1e-6) - objective(-1e-6)) / 2e-6
        analytic = float(np.sum(np.asarray(grad.astype(jnp.float32), np.float64) * direction))
        assert analytic == pytest.approx(numeric, rel=3 * tolerance, abs=3 * tolerance), name


@pytest.fixture(scope="module")
def h100():
    pytest.importorskip("jax_cuda12_plugin", reason="needs XLA:GPU: pip install 'qnext_jax[aot]'")
    from qnext_jax.plan.compiler import target_devices
    from qnext_jax.plan.targets import get_target

    return target_devices(get_target("h100"))[0]


def compiled_for(device, fn, *shapes):
    import collections
    import re

    from qnext_jax.ops.platform import lowering_for

    sharding = jax.sharding.SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]
    with jax.default_device(device), lowering_for("cuda"):
        hlo = jax.jit(fn).trace(*args).lower().compile().as_text()
    return collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo)), hlo


@pytest.mark.parametrize("start", [None, 512])
def test_mosaic_gpu_kernel_compiles_for_h100_with_the_recipes_heads(h100, start):
    """16 query heads over 2 kv heads of 256, bf16, documents as ranges, a query shard: the
    forward and backward are tokamax's Mosaic GPU kernels (forward, dq, dk/dv), no XLA loop."""
    from qnext_jax.ops.causal_attention import causal_attention

    length = 1024
    q = jax.ShapeDtypeStruct((1, length, 16, 256), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, length if start is None else 2 * length, 2, 256), jnp.bfloat16)
    docs = jax.ShapeDtypeStruct((1, length), jnp.int32)
    kv_docs = jax.ShapeDtypeStruct(kv.shape[:2], jnp.int32)
    offsets = None if start is None else (jnp.int32(1), (0, start))

    def train(q, k, v, q_docs, kv_docs):
        def loss(q, k, v):
            return jnp.sum(causal_attention(q, k, v, q_docs, kv_docs, scale=0.0625,
                                            offsets=offsets).astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    calls, hlo = compiled_for(h100, train, q, kv, kv, docs, kv_docs)
    assert calls.get("mosaic_gpu_v2", 0) == 3, calls
    assert " while(" not in hlo and " dot(" not in hlo  # no blockwise loop, no XLA product


def test_auto_falls_back_to_blockwise_where_the_kernel_does_not_apply(h100):
    from qnext_jax.ops.causal_attention import resolve_implementation
    from qnext_jax.ops.platform import lowering_for

    with jax.default_device(h100), lowering_for("cuda"):
        assert resolve_implementation("auto", 1024, 1024, jnp.bfloat16) == "mosaic_gpu"
        assert resolve_implementation("auto", 1024, 1024, jnp.float32) == "blockwise"
        assert resolve_implementation("auto", 1000, 1000, jnp.bfloat16) == "blockwise"
        assert resolve_implementation("mosaic_gpu", 1000, 1000, jnp.bfloat16) == "blockwise"
    with lowering_for("cpu"), pytest.raises(ValueError, match="GPU kernel"):
        resolve_implementation("mosaic_gpu", 1024, 1024, jnp.bfloat16)
