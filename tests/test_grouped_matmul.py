"""The tiled grouped matmul (CPU) equals jax.lax.ragged_dot and a per-group NumPy loop,
including empty groups and rows past the last group; with no more rows than a tile (decoding)
it takes the gathered path, checked the same way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnext_jax.ops.grouped_matmul import grouped_matmul, tiled_grouped_matmul
from qnext_jax.ops.platform import lowering_for


@pytest.mark.parametrize("tile", [8, 64])  # 48 rows: tiled; at most a tile of rows: gathered
@pytest.mark.parametrize("sizes", [[5, 0, 17, 3], [0, 0, 40, 0], [1, 1, 1, 1]])
def test_tiled_equals_ragged_dot_and_numpy(sizes, tile):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(48, 12)).astype(np.float32)
    weights = rng.normal(size=(4, 12, 7)).astype(np.float32)
    group_sizes = np.array(sizes, np.int32)
    ours = tiled_grouped_matmul(jnp.asarray(rows), jnp.asarray(weights), jnp.asarray(group_sizes),
                                tile=tile)
    expected = np.zeros((48, 7))
    start = 0
    for g, size in enumerate(sizes):
        expected[start:start + size] = rows[start:start + size].astype(np.float64) @ weights[g]
        start += size
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, jax.lax.ragged_dot(rows, weights, group_sizes), rtol=1e-5, atol=1e-5)

    def loss(fn, r, w):
        return jnp.sum(jnp.sin(fn(r, w, jnp.asarray(group_sizes))))

    ragged = jax.grad(lambda r, w: loss(jax.lax.ragged_dot, r, w), argnums=(0, 1))(rows, weights)
    tiled = jax.grad(lambda r, w: loss(lambda *a: tiled_grouped_matmul(*a, tile=tile), r, w),
                     argnums=(0, 1))(rows, weights)
    for a, b in zip(tiled, ragged):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", [[50, 0, 170, 30], [0, 0, 200, 0]])
def test_megablox_equals_tiled(sizes):
    """The TPU path (megablox GMM, Pallas interpret mode here), values and gradients, with rows
    past the last group (zeros, and no gradient) and a row count that is no tile multiple."""
    rng = np.random.default_rng(1)
    rows = jnp.asarray(rng.normal(size=(260, 128)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(4, 128, 64)), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)

    def loss(impl, r, w):
        return jnp.sum(jnp.sin(grouped_matmul(r, w, group_sizes, impl=impl, tile=8)))

    out = grouped_matmul(rows, weights, group_sizes, impl="megablox")
    expected = tiled_grouped_matmul(rows, weights, group_sizes, tile=8)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(out[sum(sizes):]) == 0)
    got = jax.grad(lambda r, w: loss("megablox", r, w), argnums=(0, 1))(rows, weights)
    want = jax.grad(lambda r, w: loss("tiled", r, w), argnums=(0, 1))(rows, weights)
    for name, a, b in zip(("rows", "weights"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3, err_msg=name)


def test_lowering_for_cuda_with_the_cpu_as_default_device_is_an_error():
    """tokamax checks the default device when it traces; lowering for cuda with the CPU as the
    default device is refused, with the fix (a compile-only GPU as default device, as the
    planner does), never XLA's dense ragged_dot."""
    pytest.importorskip("tokamax")
    from jax import export

    from qnext_jax.ops.grouped_matmul import GroupedMatmulUnavailable

    shape = jax.ShapeDtypeStruct
    args = shape((64, 16), jnp.bfloat16), shape((4, 16, 8), jnp.bfloat16), shape((4,), jnp.int32)
    with lowering_for("cuda"), pytest.raises(GroupedMatmulUnavailable, match="qnext_jax.plan"):
        export.export(jax.jit(lambda r, w, s: grouped_matmul(r, w, s)), platforms=["cuda"])(*args)
    with lowering_for("cuda"):  # chosen knowingly
        exported = export.export(jax.jit(lambda r, w, s: grouped_matmul(r, w, s, impl="ragged")),
                                 platforms=["cuda"])(*args)
    assert "ragged_dot" in exported.mlir_module()


def test_tokamax_takes_rows_that_are_not_a_multiple_of_its_row_tile():
    """10 rows (a token's top-10) compiled for an H100 by XLA:GPU: padded to Mosaic GPU's
    8-row tile, where the kernel refused them while lowering."""
    pytest.importorskip("tokamax")
    from qnext_jax.plan.compiler import target_devices
    from qnext_jax.plan.targets import get_target

    device = target_devices(get_target("h100"))[0]
    placed = jax.sharding.SingleDeviceSharding(device)
    args = (jax.ShapeDtypeStruct((10, 256), jnp.bfloat16, sharding=placed),
            jax.ShapeDtypeStruct((4, 256, 128), jnp.bfloat16, sharding=placed),
            jax.ShapeDtypeStruct((4,), jnp.int32, sharding=placed))
    with jax.default_device(device), lowering_for("cuda"):
        compiled = jax.jit(lambda r, w, s: grouped_matmul(r, w, s, impl="tokamax")).trace(
            *args).lower().compile()
    assert "mosaic_gpu" in compiled.as_text()


def test_rejects_an_unknown_implementation():
    with pytest.raises(ValueError, match="grouped matmul impl must be one of"):
        grouped_matmul(jnp.zeros((4, 2)), jnp.zeros((1, 2, 2)), jnp.array([4]), impl="dense")


@pytest.mark.parametrize("missing", [ImportError("No module named 'tokamax'"),
                                     NotImplementedError("Not supported on this device")])
def test_on_a_gpu_tokamax_missing_or_refusing_is_an_error_naming_the_fix(monkeypatch, missing):
    """No warning and dense fallback (the dense form of the 1B recipe needs 118 GiB): the
    error says how to install tokamax or choose XLA's ragged_dot knowingly."""
    import qnext_jax.ops.grouped_matmul as module
    from qnext_jax.ops.grouped_matmul import GroupedMatmulUnavailable

    def refuse(*args):
        raise missing

    monkeypatch.setattr(module, "_tokamax_ragged_dot", refuse)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    shape = jax.ShapeDtypeStruct
    args = shape((64, 16), jnp.bfloat16), shape((4, 16, 8), jnp.bfloat16), shape((4,), jnp.int32)
    with pytest.raises(GroupedMatmulUnavailable, match=r"pip install 'qnext_jax\[cuda\]'.*"
                       r"model.grouped_matmul=ragged"):
        jax.eval_shape(grouped_matmul, *args)
    # Chosen knowingly, XLA's ragged_dot runs.
    assert jax.eval_shape(lambda *a: grouped_matmul(*a, impl="ragged"), *args).shape == (64, 8)


def _unwritten_past_rows(rows, weights, group_sizes, *, impl, zero_past_rows=True):
    """A grouped matmul as GPU and TPU kernels leave it when not told to zero: the rows past
    the last group NaN (unwritten memory) in the output and in the rows' gradient."""
    assert not zero_past_rows, "grouped_swiglu masks the rows itself"
    past = (jnp.arange(rows.shape[0]) >= jnp.sum(group_sizes))[:, None]

    @jax.custom_vjp
    def product(rows, weights):
        return jnp.where(past, jnp.nan, tiled_grouped_matmul(rows, weights, group_sizes, 8))

    def forward(rows, weights):
        return product(rows, weights), (rows, weights)

    def backward(saved, cotangent):
        _, pull = jax.vjp(lambda r, w: tiled_grouped_matmul(r, w, group_sizes, 8), *saved)
        grad_rows, grad_weights = pull(cotangent)
        return jnp.where(past, jnp.nan, grad_rows), grad_weights

    product.defvjp(forward, backward)
    return product(rows, weights)


@pytest.mark.parametrize("kernel", ["tiled", "unwritten"])
@pytest.mark.parametrize("bounded", [False, True])
def test_sorted_swiglu_experts_against_float64(bounded, kernel, monkeypatch):
    """grouped_swiglu's sort-by-expert path (what GPUs and TPUs run; here with the tiled
    grouped matmul), skipped choices (ids past the local experts) included: values and the
    gradients of tokens, expert weights and routing weights against a per-token float64 loop; `bounded`: told how many
    choices are computed (max_choices, the expert-parallel receive side), on fewer rows.
    `unwritten`: the grouped matmuls leave NaN past the last group, as the GPU and TPU kernels
    leave unwritten memory: none of it may reach a value or a gradient."""
    from qnext_jax.ops import grouped_swiglu as module
    from qnext_jax.ops.grouped_swiglu import fused_gate_up, grouped_swiglu

    if kernel == "unwritten":
        monkeypatch.setattr(module, "grouped_matmul", _unwritten_past_rows)

    rng = np.random.default_rng(3)
    tokens, top_k, groups, width, hidden = 40, 3, 4, 6, 8
    x = rng.normal(size=(tokens, hidden))
    routing = rng.random((tokens, top_k))
    experts = rng.integers(0, groups + 1, (tokens, top_k))  # id `groups`: lives elsewhere
    gate, up = (0.5 * rng.normal(size=(groups, hidden, width)) for _ in range(2))
    down = 0.5 * rng.normal(size=(groups, width, hidden))
    cotangent = rng.normal(size=(tokens, hidden))
    max_choices = int((experts < groups).sum()) if bounded else None

    def reference(x, gate, up, down, routing):
        out = np.zeros((tokens, hidden))
        for n in range(tokens):
            for j in range(top_k):
                e = experts[n, j]
                if e < groups:
                    a, b = x[n] @ gate[e], x[n] @ up[e]
                    out[n] += routing[n, j] * ((a / (1 + np.exp(-a)) * b) @ down[e])
        return np.sum(out * cotangent)

    def ours(x, gate, up, down, routing):
        out = grouped_swiglu(x, routing, jnp.asarray(experts), fused_gate_up(gate, up), down,
                             impl="tiled", max_choices=max_choices)
        return jnp.sum(out * cotangent)

    inputs = (x, gate, up, down, routing)
    args = [jnp.asarray(a, jnp.float32) for a in inputs]
    value, grads = jax.value_and_grad(ours, argnums=(0, 1, 2, 3, 4))(*args)
    np.testing.assert_allclose(value, reference(*inputs), rtol=1e-5)
    for name, grad in zip(("tokens", "gate", "up", "down", "routing"), grads):
        assert np.all(np.isfinite(grad)), name
    step = 1e-6  # central differences of the float64 loop, four coordinates per argument
    for i, (arg, grad) in [(i, pair) for i, pair in enumerate(zip(inputs, grads))
                           for _ in range(4)]:
        index = tuple(rng.integers(0, s) for s in arg.shape)
        plus, minus = [a.copy() for a in inputs], [a.copy() for a in inputs]
        plus[i][index] += step
        minus[i][index] -= step
        numeric = (reference(*plus) - reference(*minus)) / (2 * step)
        np.testing.assert_allclose(grad[index], numeric, rtol=2e-4, atol=1e-5)
