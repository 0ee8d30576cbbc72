"""gated_delta_rule: chunked == Pallas kernels (interpret mode, both sequential drivers) ==
recurrent reference == float64 numpy recurrence, with packed segments, an initial state, a
length that is not a multiple of the chunk, and Hv = 2 Hk; forward outputs, final state and
gradients, fp32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnext_jax.ops import gated_delta_rule, l2_normalize

B, T, HK, HV, DK, DV = 2, 150, 2, 4, 16, 16


def numpy_recurrence(q, k, v, g, beta, segment_ids, state0):
    """Spec 2.3 step 8 in float64, token by token; q, k already normalised and scaled."""
    group = v.shape[2] // q.shape[2]
    batch, length = q.shape[:2]
    out = np.zeros(v.shape)
    state = state0.astype(np.float64).copy()
    for b in range(batch):
        for t in range(length):
            if t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]:
                state[b] = 0.0
            for h in range(v.shape[2]):
                key, query = k[b, t, h // group], q[b, t, h // group]
                state[b, h] *= np.exp(g[b, t, h])
                delta = beta[b, t, h] * (v[b, t, h] - state[b, h].T @ key)
                state[b, h] += np.outer(key, delta)
                out[b, t, h] = state[b, h].T @ query
    return out, state


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(B, T, HK, DK))
    k = rng.normal(size=(B, T, HK, DK))
    v = rng.normal(size=(B, T, HV, DV))
    g = -rng.uniform(0.0, 1.5, size=(B, T, HV))
    beta = rng.uniform(0.0, 1.0, size=(B, T, HV))
    segments = np.ones((B, T), np.int32)
    segments[0, 40:] = 2
    segments[0, 100:] = 1  # an id reused for a later, separate document
    segments[1, 64:] = 3  # a boundary exactly on a chunk edge
    segments[1, 65:] = 4  # a one-token document
    state0 = rng.normal(size=(B, HV, DK, DV))
    return q, k, v, g, beta, segments, state0


def _normalised(q, k):
    qn = np.asarray(l2_normalize(jnp.asarray(q, jnp.float32)), np.float64) * DK ** -0.5
    kn = np.asarray(l2_normalize(jnp.asarray(k, jnp.float32)), np.float64)
    return qn, kn


# Implementations under test; the Pallas ones use 16-token chunks so T = 150 spans 10 chunks.
IMPLS = {
    "reference": dict(impl="reference"),
    "chunked": dict(impl="chunked"),
    "pallas": dict(impl="pallas", pallas_backend="interpret", chunk_size=16),
    "pallas-loop": dict(impl="pallas", pallas_backend="interpret_loop", chunk_size=16),
    # 64-token chunks: the Triton-path inverse merges 4 x 4 blocks of 16 (one block at C = 16).
    "pallas-loop-64": dict(impl="pallas", pallas_backend="interpret_loop", chunk_size=64),
}


def run(impl, q, k, v, g, beta, segments, state0, dtype=jnp.float32):
    cast = lambda x: jnp.asarray(x, dtype)
    return gated_delta_rule(
        cast(q), cast(k), cast(v), jnp.asarray(g, jnp.float32), cast(beta),
        segment_ids=jnp.asarray(segments), initial_state=jnp.asarray(state0, jnp.float32),
        normalize_qk=True, **IMPLS[impl],
    )


@pytest.mark.parametrize("impl", list(IMPLS))
def test_matches_float64_recurrence(inputs, impl):
    q, k, v, g, beta, segments, state0 = inputs
    qn, kn = _normalised(q, k)
    expected_out, expected_state = numpy_recurrence(qn, kn, v, g, beta, segments, state0)
    out, state = run(impl, *inputs)
    assert out.shape == (B, T, HV, DV) and state.dtype == jnp.float32
    np.testing.assert_allclose(out, expected_out, atol=2e-5 * np.abs(expected_out).max(), rtol=0)
    np.testing.assert_allclose(state, expected_state, atol=2e-5 * np.abs(expected_state).max(), rtol=0)


def test_segments_restart_state(inputs):
    """A document's outputs do not depend on what came before it in the row."""
    q, k, v, g, beta, segments, state0 = inputs
    out, _ = run("chunked", *inputs)
    alone, _ = run("chunked", q[:1, 40:100], k[:1, 40:100], v[:1, 40:100], g[:1, 40:100],
                   beta[:1, 40:100], segments[:1, 40:100], np.zeros_like(state0[:1]))
    np.testing.assert_allclose(out[:1, 40:100], alone, atol=1e-5)


def test_without_segments_and_state_equals_explicit_zeros(inputs):
    q, k, v, g, beta, _, state0 = inputs
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta)]
    out, state = gated_delta_rule(*args, normalize_qk=True, impl="chunked")
    explicit, explicit_state = run("chunked", q, k, v, g, beta, np.zeros((B, T), np.int32),
                                   np.zeros_like(state0))
    np.testing.assert_allclose(out, explicit, atol=1e-6)
    np.testing.assert_allclose(state, explicit_state, atol=1e-6)


@pytest.fixture(scope="module")
def reference_gradients(inputs):
    return _gradients(inputs, "reference")


def _gradients(inputs, impl, dtype=jnp.float32):
    q, k, v, g, beta, segments, state0 = inputs
    rng = np.random.default_rng(1)
    out_weights = jnp.asarray(rng.normal(size=(B, T, HV, DV)), jnp.float32)
    state_weights = jnp.asarray(rng.normal(size=(B, HV, DK, DV)), jnp.float32)

    def loss(q, k, v, g, beta, state0):
        out, state = gated_delta_rule(q, k, v, g, beta, segment_ids=jnp.asarray(segments),
                                      initial_state=state0, normalize_qk=True, **IMPLS[impl])
        return jnp.sum(out.astype(jnp.float32) * out_weights) + jnp.sum(state * state_weights)

    args = [jnp.asarray(x, dtype) for x in (q, k, v, g, beta)] + [jnp.asarray(state0, jnp.float32)]
    grads = jax.jit(jax.grad(loss, argnums=range(6)))(*args)
    return [np.asarray(x, np.float64) for x in grads]


@pytest.mark.parametrize("impl", ["chunked", "pallas", "pallas-loop", "pallas-loop-64"])
def test_gradients_equal_reference(inputs, reference_gradients, impl):
    """d/d q, k, v, g, beta and the initial state, through the fused q/k normalisation."""
    for name, ref, got in zip("q k v g beta state0".split(), reference_gradients,
                              _gradients(inputs, impl)):
        scale = float(np.max(np.abs(ref)))
        assert scale > 0, name
        np.testing.assert_allclose(got, ref, atol=5e-5 * scale, rtol=0, err_msg=name)


def test_pallas_bfloat16_gradients_close_to_reference(inputs, reference_gradients):
    for name, ref, got in zip("q k v g beta state0".split(), reference_gradients,
                              _gradients(inputs, "pallas", jnp.bfloat16)):
        err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
        assert err < 4e-2, (name, err)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_bfloat16_inputs_close_to_float64(inputs, impl):
    """bf16 inputs (bf16 matmul operands in the kernels), fp32 state: close to the exact
    recurrence of the fp32 inputs."""
    q, k, v, g, beta, segments, state0 = inputs
    qn, kn = _normalised(q, k)
    expected_out, expected_state = numpy_recurrence(qn, kn, v, g, beta, segments, state0)
    out16, state16 = run(impl, *inputs, dtype=jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16 and state16.dtype == jnp.float32
    out_err = np.max(np.abs(np.asarray(out16, np.float64) - expected_out)) / np.abs(expected_out).max()
    state_err = np.max(np.abs(np.asarray(state16) - expected_state)) / np.abs(expected_state).max()
    assert out_err < 3e-2 and state_err < 3e-2, (out_err, state_err)


def test_matches_transformers_chunked_function(inputs):
    """Same inputs through transformers' torch_chunk_gated_delta_rule (no segments)."""
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    q, k, v, g, beta, _, state0 = inputs
    group = HV // HK
    to_torch = lambda x: torch.as_tensor(np.asarray(x, np.float32))
    expected, expected_state = torch_chunk_gated_delta_rule(
        to_torch(np.repeat(q, group, axis=2)), to_torch(np.repeat(k, group, axis=2)), to_torch(v),
        to_torch(g), to_torch(beta), initial_state=to_torch(state0), output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    out, state = run("chunked", q, k, v, g, beta, np.zeros((B, T), np.int32), state0)
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5 * float(expected.abs().max()))
    np.testing.assert_allclose(state, expected_state.numpy(), atol=1e-5 * float(expected_state.abs().max()))


def test_rejects_bad_shapes():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="multiple of key heads"):
        gated_delta_rule(q, q, jnp.zeros((1, 8, 3, 4)), jnp.zeros((1, 8, 3)), jnp.zeros((1, 8, 3)))
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, q, jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 8, 2)), jnp.zeros((1, 8, 2)),
                         initial_state=jnp.zeros((1, 2, 4, 5)))
    with pytest.raises(ValueError, match="impl"):
        gated_delta_rule(q, q, jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 8, 2)), jnp.zeros((1, 8, 2)),
                         impl="fast")


def _from_16_blocks(lower, numerics):
    """unit_lower_inverse_from_blocks on a whole matrix, assembled back for the comparison."""
    from qnext_jax.ops.chunked_delta import chunk_math

    count = lower.shape[-1] // 16
    block = lambda i, j: lower[..., 16 * i:16 * (i + 1), 16 * j:16 * (j + 1)]  # noqa: E731
    blocks = chunk_math.unit_lower_inverse_from_blocks(block, count, numerics)
    zero = jnp.zeros(lower.shape[:-2] + (16, 16), jnp.float32)
    return jnp.block([[blocks.get((i, j), zero) for j in range(count)] for i in range(count)])


@pytest.mark.parametrize("variant", ["unit_lower_inverse", "unit_lower_inverse_blocked",
                                     "from_16_blocks"])
def test_unit_lower_inverse_matches_numpy(variant):
    from qnext_jax.ops.chunked_delta import chunk_math

    rng = np.random.default_rng(5)
    lower = np.tril(rng.uniform(-1, 1, size=(3, 64, 64)), -1)
    invert = _from_16_blocks if variant == "from_16_blocks" else getattr(chunk_math, variant)
    numerics = chunk_math.Numerics(jnp.float32)
    inverse = np.asarray(invert(jnp.asarray(lower, jnp.float32), numerics), np.float64)
    expected = np.linalg.inv(np.eye(64) + lower)
    np.testing.assert_allclose(inverse, expected, atol=1e-5 * np.abs(expected).max())
    assert np.all(np.triu(inverse, 1) == 0)


@pytest.mark.parametrize("impl, normalize", [("pallas", True), ("pallas-loop", True),
                                             ("pallas", False)])
def test_pallas_pads_head_dims_the_kernels_cannot_take(impl, normalize):
    """dk = 24 and dv = 40 are no kernel block sizes: the kernels run on zero-padded heads
    (32, 64), exactly: values against the float64 recurrence, gradients against the reference.
    Normalised here or in the kernels."""
    rng = np.random.default_rng(7)
    dk, dv, length = 24, 40, 37
    q, k = rng.normal(size=(2, 1, length, HK, dk))
    if not normalize:
        q = np.asarray(l2_normalize(jnp.asarray(q, jnp.float32)), np.float64) * dk ** -0.5
        k = np.asarray(l2_normalize(jnp.asarray(k, jnp.float32)), np.float64)
    v = rng.normal(size=(1, length, HV, dv))
    g = -rng.uniform(0.0, 1.5, size=(1, length, HV))
    beta = rng.uniform(0.0, 1.0, size=(1, length, HV))
    segments = np.repeat([[1, 2]], [20, length - 20], axis=1)
    state0 = rng.normal(size=(1, HV, dk, dv))
    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta, state0)]

    def loss(impl, q, k, v, g, beta, state0):
        out, state = gated_delta_rule(q, k, v, g, beta, segment_ids=jnp.asarray(segments),
                                      initial_state=state0, normalize_qk=normalize, **IMPLS[impl])
        return jnp.sum(jnp.sin(out)) + jnp.sum(state ** 2), (out, state)

    grads, (out, state) = jax.grad(loss, argnums=range(1, 7), has_aux=True)(impl, *args)
    qn, kn = q, k
    if normalize:
        qn = np.asarray(l2_normalize(args[0]), np.float64) * dk ** -0.5
        kn = np.asarray(l2_normalize(args[1]), np.float64)
    expected_out, expected_state = numpy_recurrence(qn, kn, v, g, beta, segments, state0)
    assert out.shape == v.shape and state.shape == state0.shape
    np.testing.assert_allclose(out, expected_out, atol=2e-5 * np.abs(expected_out).max())
    np.testing.assert_allclose(state, expected_state, atol=2e-5 * np.abs(expected_state).max())
    reference, _ = jax.grad(loss, argnums=range(1, 7), has_aux=True)("reference", *args)
    for name, ref, got in zip("q k v g beta state0".split(), reference, grads):
        np.testing.assert_allclose(got, ref, atol=5e-5 * float(jnp.abs(ref).max()), err_msg=name)


def test_pallas_rejects_bad_chunk_and_backend():
    x = jnp.zeros((1, 32, 1, 16))
    args = (x, x, x, jnp.zeros((1, 32, 1)), jnp.zeros((1, 32, 1)))
    with pytest.raises(ValueError, match="power of two >= 16"):
        gated_delta_rule(*args, impl="pallas", chunk_size=8)
    with pytest.raises(ValueError, match="pallas backend"):
        gated_delta_rule(*args, impl="pallas", pallas_backend="cuda")
