"""Block-level numerics against independent references: numpy, and transformers' own functions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qnext_jax.config import ModelConfig, RopeScaling
from qnext_jax.model.moe import SparseMoE, normalized_router_init
from qnext_jax.model.norms import GatedRMSNorm, RMSNorm
from qnext_jax.model.rope import apply_rotary, rope_frequencies, rotary_tables
from qnext_jax.ops import causal_depthwise_conv

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2,
            linear_key_head_dim=8, linear_value_head_dim=8, num_experts=6, num_experts_per_tok=2,
            moe_intermediate_size=16, shared_expert_intermediate_size=16, max_position_embeddings=256)


def test_zero_centred_rmsnorm_matches_numpy():
    config = ModelConfig(**TINY)
    norm = RMSNorm(32, config)
    rng = np.random.default_rng(0)
    weight = rng.normal(size=32).astype(np.float32)
    norm.weight[...] = jnp.asarray(weight)
    x = rng.normal(size=(3, 5, 32)) * 7
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * (1 + weight)
    np.testing.assert_allclose(norm(jnp.asarray(x, jnp.float32)), expected, rtol=2e-6, atol=1e-6)
    assert float(jnp.abs(RMSNorm(32, config).weight[...]).max()) == 0.0  # init 0: scale 1


def test_gated_rmsnorm_matches_numpy():
    config = ModelConfig(**TINY)
    norm = GatedRMSNorm(8, config)
    assert np.all(np.asarray(norm.weight[...]) == 1.0)  # init 1, not zero-centred
    rng = np.random.default_rng(1)
    weight = rng.normal(size=8).astype(np.float32)
    norm.weight[...] = jnp.asarray(weight)
    x, z = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 3, 4, 8))
    expected = weight * x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * z / (1 + np.exp(-z))
    np.testing.assert_allclose(norm(jnp.asarray(x, jnp.float32), jnp.asarray(z, jnp.float32)),
                               expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("scaling", [None, RopeScaling(factor=4.0, original_max_position_embeddings=64),
                                     RopeScaling(factor=8.0, original_max_position_embeddings=32,
                                                 beta_fast=16, mscale=0.7, mscale_all_dim=0.5)])
def test_rope_frequencies_match_transformers(scaling):
    """inv_freq and attention scaling equal transformers' own rope functions (default, YaRN)."""
    pytest.importorskip("torch")  # transformers' rope code needs it
    from transformers import Qwen3NextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRotaryEmbedding

    config = ModelConfig(**TINY, rope_theta=1e6, partial_rotary_factor=0.5, rope_scaling=scaling)
    rope = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}
    if scaling is not None:
        rope.update({k: v for k, v in dataclasses.asdict(scaling).items() if v is not None})
    hf = Qwen3NextConfig(**{k: v for k, v in TINY.items()}, rope_parameters=rope)
    if scaling is None:
        inv_freq, factor = Qwen3NextRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    ours, our_factor = rope_frequencies(config)
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)
    assert our_factor == pytest.approx(factor, rel=1e-12)
    if scaling is not None:
        assert our_factor > 1.0 and not np.allclose(ours, rope_frequencies(
            dataclasses.replace(config, rope_scaling=None))[0])


def test_partial_rotary_rotates_only_the_first_dims():
    config = ModelConfig(**TINY, partial_rotary_factor=0.25)  # 4 of 16 dims
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 6, 2, 16)).astype(np.float32)
    positions = jnp.arange(6)[None]
    cos, sin = rotary_tables(positions, config, jnp.float32)
    out = np.asarray(apply_rotary(jnp.asarray(x), cos, sin))
    np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
    inv_freq, _ = rope_frequencies(config)
    angle = np.arange(6)[:, None] * inv_freq  # [T, 2]
    c, s = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    x1, x2 = x[..., :2], x[..., 2:4]
    np.testing.assert_allclose(out[..., :2], x1 * c - x2 * s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[..., 2:4], x2 * c + x1 * s, rtol=1e-5, atol=1e-6)


def test_causal_conv_matches_torch_conv1d_and_resets_at_documents():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 11, 3, 5)).astype(np.float32)  # channels as [heads, dim]
    kernel = rng.normal(size=(4, 3, 5)).astype(np.float32)
    ours = np.asarray(causal_depthwise_conv(jnp.asarray(x), jnp.asarray(kernel)))
    # PyTorch: weight [C, 1, K], padding K-1, keep the first T outputs (what HF does).
    xt = torch.as_tensor(x.reshape(2, 11, 15)).transpose(1, 2)
    wt = torch.as_tensor(kernel.reshape(4, 15).T[:, None, :])
    expected = torch.nn.functional.conv1d(xt, wt, padding=3, groups=15)[..., :11]
    np.testing.assert_allclose(ours.reshape(2, 11, 15), expected.transpose(1, 2).numpy(), atol=1e-5)
    segments = np.array([[1] * 5 + [2] * 6] * 2)
    packed = np.asarray(causal_depthwise_conv(jnp.asarray(x), jnp.asarray(kernel),
                                              segment_ids=jnp.asarray(segments)))
    second = np.asarray(causal_depthwise_conv(jnp.asarray(x[:, 5:]), jnp.asarray(kernel)))
    np.testing.assert_allclose(packed[:, 5:], second, atol=1e-6)
    np.testing.assert_allclose(packed[:, :5], ours[:, :5], atol=1e-6)


def test_router_init_rows_have_equal_norms():
    kernel = np.asarray(normalized_router_init(jax.random.key(0), 2048, 64, 0.02))
    norms = np.linalg.norm(kernel, axis=0)
    np.testing.assert_allclose(norms, 0.02 * np.sqrt(2048), rtol=1e-5)
    assert np.std(kernel) == pytest.approx(0.02, rel=0.05)
    moe = SparseMoE(ModelConfig(**TINY), rngs=nnx.Rngs(0))
    model_norms = np.linalg.norm(np.asarray(moe.router[...]), axis=0)
    np.testing.assert_allclose(model_norms, model_norms[0], rtol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_moe_ragged_equals_dense_reference(normalize):
    config = ModelConfig(**TINY, norm_topk_prob=normalize)
    moe = SparseMoE(config, rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.key(5), (3, 10, 32))
    graph, state = nnx.split(moe)

    def run(impl, state, x):
        module = nnx.merge(graph, state)
        module.config = dataclasses.replace(config, moe_impl=impl)
        out, stats = module(x)
        return jnp.sum(out ** 2), (out, stats)

    results = {impl: jax.value_and_grad(lambda s, x: run(impl, s, x), has_aux=True)(state, x)
               for impl in ("ragged", "dense")}
    (_, (out_r, stats_r)), grads_r = results["ragged"]
    (_, (out_d, stats_d)), grads_d = results["dense"]
    np.testing.assert_allclose(out_r, out_d, rtol=1e-5, atol=1e-6)
    for leaf_r, leaf_d in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads_d)):
        np.testing.assert_allclose(leaf_r, leaf_d, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(stats_r.expert_counts, stats_d.expert_counts)
    assert float(stats_r.expert_counts.sum()) == 3 * 10 * 2
    np.testing.assert_allclose(float(stats_r.prob_sums.sum()), 3 * 10, rtol=1e-5)  # sum over tokens


def test_moe_matches_numpy_per_token_loop():
    """Independent reference: route and run each token's experts one by one in float64."""
    config = ModelConfig(**TINY)
    moe = SparseMoE(config, rngs=nnx.Rngs(6))
    x = np.asarray(jax.random.normal(jax.random.key(7), (1, 9, 32)), np.float64)
    out, _ = moe(jnp.asarray(x, jnp.float32))
    p = {name: np.asarray(getattr(moe, name)[...], np.float64)
         for name in ("router", "gate_proj", "up_proj", "down_proj", "shared_expert_gate")}
    shared = {name: np.asarray(getattr(moe.shared_expert, name)[...], np.float64)
              for name in ("gate_proj", "up_proj", "down_proj")}
    silu = lambda a: a / (1 + np.exp(-a))
    expected = np.zeros((9, 32))
    for t, token in enumerate(x[0]):
        logits = token @ p["router"]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        top = np.argsort(-probs)[:2]
        weights = probs[top] / probs[top].sum()
        for e, w in zip(top, weights):
            expected[t] += w * (silu(token @ p["gate_proj"][e]) * (token @ p["up_proj"][e])) @ p["down_proj"][e]
        gate = 1 / (1 + np.exp(-(token @ p["shared_expert_gate"])))
        expected[t] += gate * (silu(token @ shared["gate_proj"]) * (token @ shared["up_proj"])) @ shared["down_proj"]
    np.testing.assert_allclose(np.asarray(out[0]), expected, rtol=1e-4, atol=1e-6)


def test_projections_together_equal_numpy_per_kernel():
    """One matmul against side-by-side kernels gives each kernel's own product (float64 NumPy),
    and so does the per-kernel path taken when `tensor` splits the heads."""
    from qnext_jax.model.projections import outputs_unsplit, project_together

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 16))
    kernels = [rng.normal(size=shape) for shape in ((16, 2, 4), (16, 3), (16, 6, 2, 1))]
    expected = [np.tensordot(x, kernel, axes=1) for kernel in kernels]
    args = (jnp.asarray(x, jnp.float32), [jnp.asarray(k, jnp.float32) for k in kernels])
    assert outputs_unsplit()
    for got, want in zip(project_together(*args), expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    from qnext_jax.parallel.mesh import MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(fsdp=1, tensor=2), devices=jax.devices()[:2])
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert not outputs_unsplit()
        for got, want in zip(project_together(*args), expected):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
