"""The tiled grouped matmul (CPU) equals jax.lax.ragged_dot and a per-group NumPy loop,
including empty groups and rows past the last group."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnext_jax.ops.grouped_matmul import tiled_grouped_matmul


@pytest.mark.parametrize("sizes", [[5, 0, 17, 3], [0, 0, 40, 0], [1, 1, 1, 1]])
def test_tiled_equals_ragged_dot_and_numpy(sizes):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(48, 12)).astype(np.float32)
    weights = rng.normal(size=(4, 12, 7)).astype(np.float32)
    group_sizes = np.array(sizes, np.int32)
    ours = tiled_grouped_matmul(jnp.asarray(rows), jnp.asarray(weights), jnp.asarray(group_sizes), tile=8)
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
    tiled = jax.grad(lambda r, w: loss(lambda *a: tiled_grouped_matmul(*a, tile=8), r, w),
                     argnums=(0, 1))(rows, weights)
    for a, b in zip(tiled, ragged):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
