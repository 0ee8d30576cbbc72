"""gated_delta_rule: chunked == recurrent reference == float64 numpy recurrence, with packed
segments, an initial state, a length that is not a multiple of the chunk, and Hv = 2 Hk;
forward outputs, final state and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnext_jax.ops import gated_delta_rule, l2_normalize

B, T, HK, HV, DK, DV = 2, 150, 2, 4, 16, 8


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


def run(impl, q, k, v, g, beta, segments, state0, dtype=jnp.float32):
    cast = lambda x: jnp.asarray(x, dtype)
    return gated_delta_rule(
        cast(q), cast(k), cast(v), jnp.asarray(g, jnp.float32), cast(beta),
        segment_ids=jnp.asarray(segments), initial_state=jnp.asarray(state0, jnp.float32),
        impl=impl, normalize_qk=True,
    )


@pytest.mark.parametrize("impl", ["reference", "chunked"])
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


def test_gradients_chunked_equal_reference(inputs):
    q, k, v, g, beta, segments, state0 = inputs
    rng = np.random.default_rng(1)
    out_weights = jnp.asarray(rng.normal(size=(B, T, HV, DV)), jnp.float32)
    state_weights = jnp.asarray(rng.normal(size=(B, HV, DK, DV)), jnp.float32)

    def loss(impl, q, k, v, g, beta, state0):
        out, state = gated_delta_rule(q, k, v, g, beta, segment_ids=jnp.asarray(segments),
                                      initial_state=state0, impl=impl, normalize_qk=True)
        return jnp.sum(out * out_weights) + jnp.sum(state * state_weights)

    args = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g, beta, state0)]
    grads = {
        impl: jax.jit(jax.grad(lambda *a, impl=impl: loss(impl, *a), argnums=range(6)))(*args)
        for impl in ("reference", "chunked")
    }
    for name, ref, chunked in zip("q k v g beta state0".split(), grads["reference"], grads["chunked"]):
        scale = float(jnp.max(jnp.abs(ref)))
        assert scale > 0, name
        np.testing.assert_allclose(chunked, ref, atol=5e-5 * scale, rtol=0, err_msg=name)


def test_bfloat16_inputs_close_to_fp32(inputs):
    out32, state32 = run("chunked", *inputs)
    out16, state16 = run("chunked", *inputs, dtype=jnp.bfloat16)
    assert out16.dtype == jnp.bfloat16 and state16.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(out16.astype(jnp.float32) - out32)) / jnp.max(jnp.abs(out32)))
    assert err < 3e-2


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


def test_unit_lower_inverse_matches_numpy():
    from qnext_jax.ops.delta_rule_chunked import unit_lower_inverse

    rng = np.random.default_rng(5)
    lower = np.tril(rng.uniform(-1, 1, size=(3, 64, 64)), -1)
    inverse = np.asarray(unit_lower_inverse(jnp.asarray(lower, jnp.float32)), np.float64)
    expected = np.linalg.inv(np.eye(64) + lower)
    np.testing.assert_allclose(inverse, expected, atol=1e-5 * np.abs(expected).max())
    assert np.all(np.triu(inverse, 1) == 0)
