"""The decode-size routed experts (ops/grouped_swiglu.gathered_swiglu): each choice times its
own gathered expert equals float64 NumPy (a choice of an expert held elsewhere skipped), its
gradients equal the CPU grouped path's, and on TPU a decode step's few rows take it (no
grouped-matmul kernel) while a training step's rows keep the kernel."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from qnext_jax.ops.grouped_swiglu import gathered_swiglu, grouped_swiglu
from qnext_jax.ops.platform import lowering_for

N, K, E, F, G = 3, 2, 16, 8, 4


def inputs():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(N, E)).astype(np.float32)
    weights = rng.uniform(size=(N, K)).astype(np.float32)
    experts = np.array([[0, 3], [2, G], [1, 1]], np.int32)  # id G: held on another device
    gate, up = (0.3 * rng.normal(size=(G, E, F)).astype(np.float32) for _ in range(2))
    down = 0.3 * rng.normal(size=(G, F, E)).astype(np.float32)
    return tokens, weights, experts, gate, up, down


def numpy_reference(tokens, weights, experts, gate, up, down):
    out = np.zeros((N, E))
    for n in range(N):
        for j in range(K):
            x = experts[n, j]
            if x >= G:
                continue
            g, u = tokens[n] @ gate[x].astype(np.float64), tokens[n] @ up[x].astype(np.float64)
            hidden = g / (1 + np.exp(-g)) * u
            out[n] += weights[n, j] * (hidden @ down[x])
    return out


def test_equals_numpy_and_the_grouped_path():
    tokens, weights, experts, gate, up, down = inputs()
    got = gathered_swiglu(*(jnp.asarray(x) for x in (tokens, weights, experts, gate, up, down)))
    np.testing.assert_allclose(got, numpy_reference(tokens, weights, experts, gate, up, down),
                               rtol=1e-5, atol=1e-6)

    def loss(fn, tokens, weights, gate, up, down):
        return jnp.sum(jnp.sin(fn(tokens, weights, gate, up, down)))

    gathered = lambda t, w, g, u, d: gathered_swiglu(t, w, experts, g, u, d)  # noqa: E731
    grouped = lambda t, w, g, u, d: grouped_swiglu(t, w, experts, (g, u), d, "tiled")  # noqa: E731
    args = tuple(jnp.asarray(x) for x in (tokens, weights, gate, up, down))
    for a, b in zip(jax.grad(lambda *a: loss(gathered, *a), argnums=range(5))(*args),
                    jax.grad(lambda *a: loss(grouped, *a), argnums=range(5))(*args)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_on_tpu_decode_rows_gather_and_training_rows_use_the_kernel():
    shape = jax.ShapeDtypeStruct

    def lowered(tokens):
        args = (shape((tokens, 2048), jnp.bfloat16), shape((tokens, 10), jnp.float32),
                shape((tokens, 10), jnp.int32), shape((64, 2048, 128), jnp.bfloat16),
                shape((64, 2048, 128), jnp.bfloat16), shape((64, 128, 2048), jnp.bfloat16))

        def moe(tokens, weights, experts, gate, up, down):
            return grouped_swiglu(tokens, weights, experts, (gate, up), down)

        with lowering_for("tpu"):
            return export.export(jax.jit(moe), platforms=["tpu"])(*args).mlir_module()

    assert "tpu_custom_call" not in lowered(2)  # 20 rows for 64 experts: gathered
    assert "tpu_custom_call" in lowered(512)  # 5,120 rows: the grouped matmul kernel
