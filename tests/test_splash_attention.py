"""TPU splash attention through our wrapper: in Pallas' interpret mode it equals the blockwise
attention on packed rows (reused ids, GQA), values and gradients, also for the queries of a
sequence shard; it lowers for TPU (Mosaic custom calls forward and backward); lengths its
blocks cannot tile fall back to blockwise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from qnext_jax.ops.blockwise_attention import blockwise_attention
from qnext_jax.ops.causal_attention import resolve_implementation
from qnext_jax.ops.segments import document_index
from qnext_jax.ops.splash_attention import splash_attention

B, T, N, K, D = 1, 256, 4, 2, 64


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, N, D)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, D)), jnp.float32) for _ in range(2))
    segments = np.ones((B, T), np.int32)
    segments[0, 90:200] = 2  # ids 1, 2, 1: three documents
    return q, k, v, document_index(jnp.asarray(segments))


def grads(fn, q, k, v):
    return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2))(q, k, v)


def test_interpreted_splash_equals_blockwise(operands):
    q, k, v, docs = operands
    scale = D ** -0.5
    ours = lambda q, k, v: splash_attention(q, k, v, docs, docs, scale=scale, interpret=True)  # noqa: E731
    reference = lambda q, k, v: blockwise_attention(  # noqa: E731
        q, k, v, q_docs=docs, kv_docs=docs, scale=scale)
    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", grads(ours, q, k, v), grads(reference, q, k, v)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"grad {name}")


def test_interpreted_splash_for_the_second_of_two_sequence_shards(operands):
    q, k, v, docs = operands
    half = slice(T // 2, T)
    ours = splash_attention(q[:, half], k, v, docs[:, half], docs, scale=0.125,
                            offsets=(jnp.int32(1), (0, T // 2)), interpret=True)
    full = blockwise_attention(q, k, v, q_docs=docs, kv_docs=docs, scale=0.125)
    np.testing.assert_allclose(ours, full[:, half], rtol=1e-5, atol=1e-5)


def test_splash_lowers_for_tpu_forward_and_backward():
    shape = jax.ShapeDtypeStruct

    def train(q, k, v, docs):
        return grads(lambda q, k, v: splash_attention(q, k, v, docs, docs, scale=0.0625), q, k, v)

    args = (shape((B, 512, 16, 256), jnp.bfloat16), shape((B, 512, 2, 256), jnp.bfloat16),
            shape((B, 512, 2, 256), jnp.bfloat16), shape((B, 512), jnp.int32))
    exported = export.export(jax.jit(train), platforms=["tpu"])(*args)
    text = exported.mlir_module()
    # The forward kernel, then the backward's dq and dk/dv kernels.
    assert text.count("tpu_custom_call") == 3, text.count("tpu_custom_call")
    assert [a.shape for a in exported.out_avals] == [a.shape for a in args[:3]]


def test_query_starts_share_kernels_on_tpu():
    """16 possible query starts, each visiting a different number of key blocks, lower to 8
    kernels forward and 8 + 8 backward, not 16 each: the starts live in the mask tables the
    kernel reads, not in its code."""
    shape = jax.ShapeDtypeStruct
    starts = tuple(range(0, 16 * 512, 512))

    def train(q, k, v, q_docs, kv_docs, index):
        return grads(lambda q, k, v: splash_attention(
            q, k, v, q_docs, kv_docs, scale=0.0625, offsets=(index, starts)), q, k, v)

    args = (shape((B, 256, 16, 256), jnp.bfloat16), shape((B, 8192, 2, 256), jnp.bfloat16),
            shape((B, 8192, 2, 256), jnp.bfloat16), shape((B, 256), jnp.int32),
            shape((B, 8192), jnp.int32), shape((), jnp.int32))
    text = export.export(jax.jit(train), platforms=["tpu"])(*args).mlir_module()
    assert text.count("tpu_custom_call") == 3 * 8, text.count("tpu_custom_call")


def test_lengths_splash_cannot_tile_fall_back_to_blockwise():
    assert resolve_implementation("splash", 256, 256) == "splash"
    assert resolve_implementation("splash", 200, 200) == "blockwise"
    assert resolve_implementation("auto", 256, 256) == "blockwise"  # CPU
    with pytest.raises(ValueError, match="attention impl must be one of"):
        resolve_implementation("flash", 256, 256)


def test_interpreted_splash_across_two_sequence_shards(operands):
    """attention_across_shards with splash: each shard switches to its own offset's kernel."""
    from jax.sharding import AxisType, Mesh, PartitionSpec as P

    from qnext_jax.parallel.context_parallel import attention_across_shards

    q, k, v, docs = operands
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("sequence",), axis_types=(AxisType.Auto,))
    acts = P(None, "sequence", None, None)
    split = jax.jit(jax.shard_map(
        lambda q, k, v, docs: attention_across_shards(q, k, v, docs, scale=0.125, impl="splash"),
        mesh=mesh, in_specs=(acts, acts, acts, P(None, "sequence")), out_specs=acts,
        check_vma=False))
    full = blockwise_attention(q, k, v, q_docs=docs, kv_docs=docs, scale=0.125)
    np.testing.assert_allclose(split(q, k, v, docs), full, rtol=1e-5, atol=1e-5)


def test_model_with_splash_attention_equals_blockwise(repo_root):
    from flax import nnx

    from qnext_jax.config import ModelConfig
    from qnext_jax.model import Qwen3NextModel

    config = ModelConfig.from_yaml(repo_root / "configs" / "tiny.yaml").replace(
        num_hidden_layers=4, mtp_num_hidden_layers=0)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (1, 128)))
    segments = jnp.asarray(np.r_[np.ones(50), 2 * np.ones(78)][None].astype(np.int32))

    def logits(impl):
        model = Qwen3NextModel(config.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        return model(ids, segment_ids=segments).logits

    np.testing.assert_allclose(logits("splash"), logits("blockwise"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start", [0, 256, 640, 1536])
def test_mask_tables_equal_splash_own_causal_mask(start):
    """Our causal mask (the start in the query positions, blocks classified from their first
    and last positions) gives the kernel the tables splash builds from its own CausalMask with
    that offset, evaluating every element: forward, dq and dkv."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)

    from qnext_jax.ops.splash_attention import _kernel

    ours = _kernel(2, 256, 2048, start, interpret=True)
    sizes = kernel_lib.BlockSizes(
        block_q=256, block_kv=512, block_kv_compute=512, block_q_dkv=256, block_kv_dkv=512,
        block_kv_dkv_compute=512, block_q_dq=256, block_kv_dq=512)
    theirs = kernel_lib.make_splash_mha(
        mask_lib.MultiHeadMask([mask_lib.CausalMask((256, 2048), offset=start)] * 2),
        head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=True)
    for name in ("fwd_mask_info", "dq_mask_info", "dkv_mask_info"):
        a, b = getattr(ours, name), getattr(theirs, name)
        for field in ("data_next", "block_mask"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field),
                                          err_msg=f"{name}.{field}")
        np.testing.assert_array_equal(a.q_sequence, b.q_sequence + start)
