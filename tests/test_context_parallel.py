"""Context parallelism on 8 CPU devices: the delta rule, the short conv and attention with each
row split over `sequence` = 8 and 4 equal one device — outputs, final states and gradients —
on packed rows with a document over three shards, a boundary exactly on a shard edge, a
1-token document at a shard's start, a reused segment id and an initial state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, PartitionSpec as P

from qnext_jax.ops import gated_delta_rule
from qnext_jax.ops.blockwise_attention import blockwise_attention
from qnext_jax.ops.causal_conv import causal_conv_silu
from qnext_jax.ops.segments import document_index
from qnext_jax.parallel.context_parallel import (
    attention_across_shards, conv_silu_across_shards, delta_rule_across_shards, from_zigzag,
    to_zigzag,
)

B, T, HK, HV, DK, DV = 2, 64, 1, 2, 8, 8


def segments():
    # Row 0: tokens 0..23 (shards 0-2 at 8 tokens a shard), 24..31 (starts on a shard edge),
    # 32..47 reusing id 1, a 1-token document at 48 (a shard's first token), 49..63.
    # Row 1: one document over every shard.
    ids = np.ones((B, T), np.int32)
    ids[0, 24:32], ids[0, 48], ids[0, 49:] = 2, 3, 4
    return jnp.asarray(ids)


def mesh_for(shards):
    devices = np.asarray(jax.devices()[:8]).reshape(8 // shards, shards)
    return Mesh(devices, ("data", "sequence"), axis_types=(AxisType.Auto,) * 2)


def sharded(fn, mesh, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=False))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    q, k, v = normal(B, T, HK, DK), normal(B, T, HK, DK), normal(B, T, HV, DV)
    g = -jnp.abs(normal(B, T, HV)) * 0.3
    beta = jax.nn.sigmoid(normal(B, T, HV))
    state0 = normal(B, HV, DK, DV) * 0.5
    weights = normal(B, T, HV, DV), normal(B, HV, DK, DV)  # the loss's cotangents
    return (q, k, v, g, beta, state0), weights


def rule(impl):
    def run(q, k, v, g, beta, docs, state):
        return gated_delta_rule(q, k, v, g, beta, segment_ids=docs, initial_state=state,
                                impl=impl, normalize_qk=True)
    return run


single_rule = rule("chunked")


# "pallas" runs the GPU/TPU kernels in interpret mode here: the shards' second pass and the
# identity columns go through the kernels' own padding (dk 8 -> 16, dv 8 + 8 columns).
@pytest.mark.parametrize("shards,impl", [(8, "chunked"), (4, "chunked"), (4, "pallas")])
def test_delta_rule_over_shards_equals_one_device(inputs, shards, impl):
    args, (w_out, w_state) = inputs
    docs = document_index(segments())
    rows, heads, gates = P("data", "sequence"), P("data", "sequence", None, None), P("data", "sequence", None)
    state = P("data", None, None, None)

    def across(q, k, v, g, beta, docs, state0):
        return delta_rule_across_shards(rule(impl), q, k, v, g, beta, docs, state0)

    split = sharded(across, mesh_for(shards), (heads, heads, heads, gates, gates, rows, state),
                    (heads, state))

    def loss(fn, *args):
        out, final = fn(*args[:5], docs, args[5])
        return jnp.sum(out * w_out) + jnp.sum(final * w_state), (out, final)

    (_, expected), expected_grads = jax.value_and_grad(
        lambda *a: loss(single_rule, *a), argnums=range(6), has_aux=True)(*args)
    (_, got), got_grads = jax.value_and_grad(
        lambda *a: loss(split, *a), argnums=range(6), has_aux=True)(*args)
    for name, a, b in zip(("out", "final state"), got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    for name, a, b in zip("q k v g beta state0".split(), got_grads, expected_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"grad {name}")


@pytest.mark.parametrize("shards", [8, 4])
def test_conv_over_shards_equals_one_device(inputs, shards):
    (_, _, v, *_), _ = inputs
    docs = document_index(segments())
    kernel = jnp.asarray(np.random.default_rng(1).normal(size=(4, HV, DV)), jnp.float32)
    acts = P("data", "sequence", None, None)
    split = sharded(conv_silu_across_shards, mesh_for(shards),
                    (acts, P(), P("data", "sequence")), acts)
    loss = lambda fn, x, w: jnp.sum(jnp.sin(fn(x, w, docs)))  # noqa: E731
    single = lambda x, w, docs: causal_conv_silu(x, w, segment_ids=docs)  # noqa: E731
    np.testing.assert_allclose(split(v, kernel, docs), single(v, kernel, docs), rtol=1e-6, atol=1e-6)
    got = jax.grad(lambda *a: loss(split, *a), argnums=(0, 1))(v, kernel)
    expected = jax.grad(lambda *a: loss(single, *a), argnums=(0, 1))(v, kernel)
    for name, a, b in zip(("x", "kernel"), got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"grad {name}")


@pytest.mark.parametrize("shards, zigzag", [(8, True), (4, True), (8, False)])
def test_attention_over_shards_equals_one_device(shards, zigzag):
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(B, T, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, 2, 8)), jnp.float32) for _ in range(2))
    docs = document_index(segments())
    acts = P("data", "sequence", None, None)

    def across(q, k, v, docs):
        return attention_across_shards(q, k, v, docs, scale=0.3, zigzag=zigzag)

    split = sharded(across, mesh_for(shards), (acts, acts, acts, P("data", "sequence")), acts)
    single = lambda q, k, v, docs: blockwise_attention(  # noqa: E731
        q, k, v, q_docs=docs, kv_docs=docs, scale=0.3)
    loss = lambda fn, *a: jnp.sum(jnp.sin(fn(*a, docs)))  # noqa: E731
    np.testing.assert_allclose(split(q, k, v, docs), single(q, k, v, docs), rtol=1e-5, atol=1e-6)
    got = jax.grad(lambda *a: loss(split, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(single, *a), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"grad {name}")


@pytest.mark.parametrize("shards, max_kernels", [(2, 8), (4, 1)])
def test_zigzag_attention_through_splash_equals_one_device(shards, max_kernels, monkeypatch):
    """The TPU kernel (interpret mode) in the zig-zag order, chunks of 128 tokens (splash's
    tile): 2 shards, 4 possible chunk starts, a kernel each; 4 shards, 8 starts sharing one
    kernel (cap 1) whose mask tables are padded to the widest start's (keys in 2 blocks of
    512: the early chunks visit one, the late ones two)."""
    from qnext_jax.ops import splash_attention as splash_module

    monkeypatch.setattr(splash_module, "_MAX_KERNELS", max_kernels)
    rng = np.random.default_rng(5)
    length = 256 * shards
    q = jnp.asarray(rng.normal(size=(1, length, 2, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, length, 1, 64)), jnp.float32) for _ in range(2))
    ids = np.ones((1, length), np.int32)
    ids[0, 100:300] = 2  # ids 1, 2, 1: three documents, edges inside chunks
    docs = document_index(jnp.asarray(ids))
    mesh = Mesh(np.asarray(jax.devices()[:shards]), ("sequence",), axis_types=(AxisType.Auto,))
    acts = P(None, "sequence", None, None)
    split = sharded(lambda q, k, v, docs: attention_across_shards(q, k, v, docs, scale=0.125,
                                                                  impl="splash"),
                    mesh, (acts, acts, acts, P(None, "sequence")), acts)
    single = lambda q, k, v, docs: blockwise_attention(  # noqa: E731
        q, k, v, q_docs=docs, kv_docs=docs, scale=0.125)
    np.testing.assert_allclose(split(q, k, v, docs), single(q, k, v, docs), rtol=1e-5, atol=1e-5)
    loss = lambda fn, *a: jnp.sum(jnp.sin(fn(*a, docs)))  # noqa: E731
    got = jax.grad(lambda *a: loss(split, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(single, *a), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"grad {name}")


@pytest.mark.parametrize("shards", [8, 4])
def test_zigzag_gives_every_shard_the_same_causal_work(shards):
    """The positions each shard attends, moved by the real permutation: the causal work (keys a
    query may see, summed over the shard's queries) within 10% across shards — against 2P-1
    times more for the last contiguous shard than the first — and back to row order after."""
    length = 8 * 256
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (8 // shards, length))
    rows = P("data", "sequence")

    def attended(x):
        low, high = to_zigzag(x)
        return jnp.concatenate([low, high], axis=1), from_zigzag(low, high)

    held, back = sharded(attended, mesh_for(shards), (rows,), (rows, rows))(positions)
    np.testing.assert_array_equal(back, positions)
    work = (np.asarray(held[0]).reshape(shards, -1) + 1).sum(axis=1)  # keys visible, by shard
    assert sorted(np.asarray(held[0])) == list(range(length))  # every query attended once
    assert work.max() <= 1.1 * work.min(), work
    contiguous = (np.arange(length).reshape(shards, -1) + 1).sum(axis=1)
    assert contiguous.max() > (2 * shards - 2) * contiguous.min()


def test_attention_layer_with_more_tensor_ranks_than_kv_heads_equals_one_device(repo_root):
    """4 query heads, 2 kv heads on tensor = 4 (each rank picks its query head's kv head) and
    sequence = 2: the layer's output and gradients are those of one device."""
    from flax import nnx

    from qnext_jax.config import ModelConfig
    from qnext_jax.model.attention import GatedAttention
    from qnext_jax.model.rope import rotary_tables
    from qnext_jax.parallel.mesh import MeshConfig, make_mesh

    config = ModelConfig.from_yaml(repo_root / "configs" / "tiny.yaml")
    layer = GatedAttention(config, rngs=nnx.Rngs(0))
    graph, params = nnx.split(layer)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(B, T, config.hidden_size)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    rotary = rotary_tables(positions, config, jnp.float32)

    def loss(params, x):
        out = nnx.merge(graph, params)(x, rotary=rotary, segment_ids=segments())
        return jnp.sum(jnp.sin(out)), out

    expected = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    mesh = make_mesh(MeshConfig(fsdp=1, sequence=2, tensor=4))

    @jax.jit
    def on_mesh(params, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    replicated = jax.sharding.NamedSharding(mesh, P())
    got = on_mesh(*jax.device_put((params, x), replicated))
    np.testing.assert_allclose(got[0][1], expected[0][1], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
        # Sums over 2 sequence shards and 4 tensor ranks in another order: fp32 rounding.
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
