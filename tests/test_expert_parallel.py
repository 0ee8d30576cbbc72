"""The expert-parallel MoE (shard_map + all-to-all over `expert`) against the dense reference:
outputs and gradients on several meshes, and the capacity factor's dropping rule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO_ROOT
from qnext_jax.config import ModelConfig
from qnext_jax.model.moe import SparseMoE, route
from qnext_jax.parallel.axes import ShardingRules
from qnext_jax.parallel.mesh import MeshConfig, make_mesh

MESHES = {
    "expert8": MeshConfig(fsdp=1, expert=8),
    "expert4_tensor2": MeshConfig(fsdp=1, expert=4, tensor=2),
    "data2_fsdp2_expert2": MeshConfig(data=2, fsdp=2, expert=2),
}


def moe_and_input(**changes):
    config = ModelConfig.from_yaml(REPO_ROOT / "configs" / "tiny.yaml").replace(**changes)
    moe = SparseMoE(config, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (8, 16, config.hidden_size), jnp.float32)
    return config, moe, x


def run_sharded(moe, x, mesh):
    """Output and gradients (wrt x and the parameters) with every array laid out as training
    lays it out: batch over data/fsdp/expert, weights by the table."""
    graphdef, params = nnx.split(moe)
    rules = ShardingRules(moe.config, mesh)

    def loss(params, x):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            out, _ = nnx.merge(graphdef, params)(x)
        return jnp.sum(out * jnp.cos(out)), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), in_shardings=(
        rules.param_shardings(params), NamedSharding(mesh, P(("data", "fsdp", "expert"))),
    ))
    (_, out), grads = fn(params, x)
    return out, grads


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_expert_parallel_equals_dense(mesh_name):
    config, moe, x = moe_and_input()
    out, grads = run_sharded(moe, x, make_mesh(MESHES[mesh_name]))
    dense = SparseMoE(config.replace(moe_impl="dense"), rngs=nnx.Rngs(1))
    (_, ref_out), ref_grads = jax.value_and_grad(
        lambda m, x: (lambda o: (jnp.sum(o * jnp.cos(o)), o))(m(x)[0]), argnums=(0, 1),
        has_aux=True)(dense, x)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[1], ref_grads[1], rtol=1e-4, atol=1e-6)
    ours = dict(nnx.to_flat_state(grads[0]))
    for path, ref in nnx.to_flat_state(nnx.state(ref_grads[0], nnx.Param)):
        np.testing.assert_allclose(ours[path].value, ref.value, rtol=1e-4, atol=1e-6,
                                   err_msg=str(path))


def dropped_weights(weights, experts, shards, local_experts, capacity, choices):
    """NumPy statement of the capacity rule: each device's tokens, in order, fill each
    destination's buffer; a token past `capacity` loses its choices on that destination. Each
    destination then computes at most `choices` of the choices it received, in arrival order
    (source device, then buffer slot, then the token's choice order); the rest are dropped."""
    weights = np.array(weights)
    experts = np.asarray(experts)
    tokens_per_device = len(experts) // shards
    kept = np.zeros(weights.shape, bool)
    for device in range(shards):
        rows = slice(device * tokens_per_device, (device + 1) * tokens_per_device)
        home = experts[rows] // local_experts
        for destination in range(shards):
            visits = (home == destination).any(axis=1)
            fits = visits & (np.cumsum(visits) - 1 < capacity)
            kept[rows] |= fits[:, None] & (home == destination)
    for destination in range(shards):
        computed = 0
        for device in range(shards):
            for token in range(device * tokens_per_device, (device + 1) * tokens_per_device):
                for j in range(experts.shape[1]):
                    if kept[token, j] and experts[token, j] // local_experts == destination:
                        computed += 1
                        kept[token, j] = computed <= choices
    weights[~kept] = 0
    return weights


@pytest.mark.parametrize("factor", [0.5, 1.0])
def test_capacity_factor_drops_overflowing_choices_only(factor):
    config, moe, x = moe_and_input(moe_capacity_factor=factor)
    mesh = make_mesh(MESHES["expert4_tensor2"])
    out, _ = run_sharded(moe, x, mesh)

    tokens = x.reshape(-1, config.hidden_size)
    _, weights, experts = route(tokens @ moe.router[...], config.num_experts_per_tok, True)
    shards, per_device = 4, tokens.shape[0] // 4
    top_k = config.num_experts_per_tok
    capacity = min(per_device, math.ceil(factor * per_device * top_k / shards))
    choices = min(shards * capacity * top_k, math.ceil(factor * per_device * top_k))
    kept = dropped_weights(weights, experts, shards, config.num_experts // shards, capacity,
                           choices)
    assert (kept == 0).sum() > 0  # the factor is small enough to drop something
    unbounded = dropped_weights(weights, experts, shards, config.num_experts // shards,
                                capacity, choices=10 ** 9)
    if factor < 1:  # the receive side's bound drops choices the buffers' bound kept
        assert (kept == 0).sum() > (unbounded == 0).sum()
    routed = moe.experts_dense(tokens, jnp.asarray(kept), experts)
    shared = jax.nn.sigmoid(tokens @ moe.shared_expert_gate[...])[:, None] * moe.shared_expert(tokens)
    np.testing.assert_allclose(out.reshape(tokens.shape), routed + shared, rtol=1e-5, atol=1e-6)
