"""The CPU routed experts (capacity buckets + overflow tiles, hand-written VJP) against a float64
NumPy loop over tokens and choices (values) and autodiff of the dense every-expert formulation
(gradients): balanced routing (buckets only), a skewed router that overflows into the tile loop,
and choices of experts that live on another device (ids >= G, skipped)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnext_jax.ops.bucketed_swiglu import bucketed_swiglu, capacity_for, make_plan


def _problem(seed, tokens=40, top_k=2, experts=4, hidden=12, width=6, skew=0.0, foreign=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(tokens, experts + foreign))
    logits[:, 0] += skew  # skew > 0: expert 0 is everyone's first choice
    choice = np.argsort(-logits, axis=1)[:, :top_k].astype(np.int32)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape) * 0.4, jnp.float32)  # noqa: E731
    return (f32(tokens, hidden), jnp.asarray(rng.uniform(size=(tokens, top_k)), jnp.float32),
            jnp.asarray(choice), f32(experts, hidden, width), f32(experts, hidden, width),
            f32(experts, width, hidden))


def _numpy_reference(rows, weights, experts, gate_w, up_w, down_w):
    rows, weights, gate_w, up_w, down_w = (np.asarray(a, np.float64)
                                           for a in (rows, weights, gate_w, up_w, down_w))
    out = np.zeros_like(rows)
    for n in range(rows.shape[0]):
        for j, e in enumerate(np.asarray(experts)[n]):
            if e >= gate_w.shape[0]:
                continue
            gate, up = rows[n] @ gate_w[e], rows[n] @ up_w[e]
            out[n] += weights[n, j] * ((gate / (1 + np.exp(-gate)) * up) @ down_w[e])
    return out


def _dense(rows, weights, experts, gate_w, up_w, down_w):
    """Every (local) expert on every row, combined by the routing weights."""
    combine = jnp.einsum("NKX,NK->NX", jax.nn.one_hot(experts, gate_w.shape[0]), weights)
    hidden = jax.nn.silu(jnp.einsum("NE,XEF->NXF", rows, gate_w)) * jnp.einsum(
        "NE,XEF->NXF", rows, up_w)
    return jnp.einsum("NXF,XFE,NX->NE", hidden, down_w, combine)


@pytest.mark.parametrize("case", [
    dict(seed=0),  # balanced: a capacity of 1.25x the mean holds every choice
    dict(seed=1, skew=3.0, capacity_factor=0.5),  # expert 0 overflows into several tiles
    dict(seed=2, foreign=4, capacity_factor=0.75),  # half the choices live elsewhere
    dict(seed=3, top_k=1, skew=1.0, tile=16),
])
def test_values_and_gradients(case):
    case = dict(case)
    options = {k: case.pop(k) for k in ("capacity_factor", "tile") if k in case}
    options.setdefault("tile", 8)
    args = _problem(**case)
    ours = lambda *a: bucketed_swiglu(*a, **options)  # noqa: E731
    np.testing.assert_allclose(ours(*args), _numpy_reference(*args), rtol=2e-5, atol=2e-6)

    def loss(fn, rows, weights, *expert_weights):
        return jnp.sum(jnp.sin(fn(rows, weights, args[2], *expert_weights)))

    differentiable = (0, 1, 3, 4, 5)
    inputs = [args[i] for i in differentiable]
    got = jax.grad(lambda *a: loss(ours, *a), argnums=range(5))(*inputs)
    want = jax.grad(lambda *a: loss(_dense, *a), argnums=range(5))(*inputs)
    for name, a, b in zip(("rows", "weights", "gate", "up", "down"), got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_overflow_takes_the_tile_loop():
    """The skewed case above really goes past the buckets: expert 0's overflow needs tiles."""
    _, _, experts, gate_w, _, _ = _problem(1, skew=3.0)
    capacity = capacity_for(experts.size, gate_w.shape[0], 0.5)
    plan = make_plan(experts, gate_w.shape[0], capacity, tile=8)
    load = np.bincount(np.asarray(experts).ravel(), minlength=4)
    expected_tiles = sum(-(-max(n - capacity, 0) // 8) for n in load)
    assert expected_tiles >= 2 and int(plan.tiles) == expected_tiles


def test_jit_and_scan_compose():
    """Under jit inside a scan over layers (as the model runs it), gradients still match."""
    args = _problem(4, skew=2.0)
    stacked = [jnp.stack([w, w * 0.5]) for w in args[3:]]

    def model(fn, rows, layers):
        def layer(x, w):
            return x + fn(x, args[1], args[2], *w), None
        return jnp.sum(jax.lax.scan(layer, rows, layers)[0] ** 2)

    ours = lambda *a: bucketed_swiglu(*a, capacity_factor=0.5, tile=8)  # noqa: E731
    got = jax.jit(jax.grad(lambda r, l: model(ours, r, l), argnums=(0, 1)))(args[0], stacked)
    want = jax.grad(lambda r, l: model(_dense, r, l), argnums=(0, 1))(args[0], stacked)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
