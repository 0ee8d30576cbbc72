"""Whole-model properties: the 80B preset on paper, packed sequences, MTP wiring, the scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from numerics import relative_error
from qnext_jax.config import ModelConfig
from qnext_jax.convert.layout import checkpoint_rules
from qnext_jax.model import Qwen3NextModel


@pytest.fixture(scope="module")
def tiny_config(request):
    from conftest import REPO_ROOT

    return ModelConfig.from_yaml(REPO_ROOT / "configs/tiny.yaml")


def stressed_model(config, seed=0, scale=4.0):
    """Random init with the matrices scaled up, so every path carries a visible signal."""
    model = Qwen3NextModel(config, rngs=nnx.Rngs(seed))
    graph, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x + 0.1, state)
    return nnx.merge(graph, state)


def test_80b_parameter_count_on_paper(repo_root):
    config = ModelConfig.from_yaml(repo_root / "configs/qwen3_next_80b_a3b.yaml")
    abstract = nnx.eval_shape(lambda: Qwen3NextModel(config, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    # The spec's tensor table (section 7): every HF tensor of the released checkpoint.
    table = sum(int(np.prod(rule.hf_shape)) for rule in checkpoint_rules(config))
    counts = config.param_counts()
    assert ours == table == counts["total"]
    assert round(counts["main"] / 1e9, 1) == 79.7
    assert round(counts["total"] / 1e9, 1) == 81.3
    assert params["blocks"]["layers"][0]["mlp"]["gate_proj"].value.shape == (12, 512, 2048, 512)


def test_packed_rows_give_each_document_its_own_logits(tiny_config):
    model = stressed_model(tiny_config)
    lengths = [30, 47, 23]  # 100 tokens: the chunked delta rule crosses a chunk boundary
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, tiny_config.vocab_size, n) for n in lengths]
    packed_ids = jnp.asarray(np.concatenate(documents))[None]
    positions = jnp.asarray(np.concatenate([np.arange(n) for n in lengths]))[None]
    forward = jax.jit(lambda ids, pos, seg: model(ids, positions=pos, segment_ids=seg))
    unmasked = forward(packed_ids, positions, None)
    # A reused id (1, 2, 1) is still three documents: a boundary is where the id changes, for
    # attention as for the conv and the delta rule.
    for ids in ([1, 2, 3], [1, 2, 1]):
        packed = forward(packed_ids, positions, jnp.asarray(np.repeat(ids, lengths))[None])
        _check_each_document_alone(forward, packed, unmasked, documents, lengths)


def _check_each_document_alone(forward, packed, unmasked, documents, lengths):
    start = 0
    for doc, n in zip(documents, lengths):
        ids = jnp.asarray(doc)[None]
        alone = forward(ids, jnp.arange(n)[None], jnp.ones((1, n), jnp.int32))
        np.testing.assert_allclose(packed.logits[:, start:start + n], alone.logits,
                                   atol=2e-5 * float(jnp.abs(alone.logits).max()))
        # MTP reads token i+1: compare all but the document's last position.
        np.testing.assert_allclose(packed.mtp_logits[0][:, start:start + n - 1],
                                   alone.mtp_logits[0][:, :n - 1],
                                   atol=2e-5 * float(jnp.abs(alone.mtp_logits[0]).max()))
        if start:  # without segment ids the neighbour leaks in, visibly: the test can fail
            assert relative_error(unmasked.logits[:, start:start + n], alone.logits) > 1e-2
        start += n


def test_mtp_fuses_the_next_token_embedding_with_the_normed_hidden(tiny_config):
    config = tiny_config.replace(mtp_depth=2)
    model = stressed_model(config, seed=1)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, config.vocab_size, (2, 12)))
    out = model(ids)
    assert len(out.mtp_logits) == 2 and out.mtp_router_stats.expert_counts.shape == (2, 8)
    mtp, positions = model.mtp, jnp.broadcast_to(jnp.arange(12), (2, 12))
    from qnext_jax.model.rope import rotary_tables

    rotary = rotary_tables(positions, config, jnp.float32)
    previous = out.hidden
    for depth in (1, 2):
        ahead = jnp.pad(ids[:, depth:], [(0, 0), (0, depth)])
        fused = jnp.concatenate([mtp.pre_fc_norm_embedding(model.embed[...][ahead]),
                                 mtp.pre_fc_norm_hidden(previous)], axis=-1) @ mtp.fc[...]
        h, _ = mtp.layers[0](fused, rotary=rotary, segment_ids=None, valid=None)
        previous = mtp.norm(h)
        expected = previous @ model.lm_head[...]
        np.testing.assert_allclose(out.mtp_logits[depth - 1], expected, rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(expected).max()))
    # Main logits do not depend on the MTP module; mtp=False skips it.
    assert model(ids, mtp=False).mtp_logits == ()


def test_scan_keeps_the_program_size_independent_of_depth(tiny_config):
    def count_dots(num_layers):
        config = tiny_config.replace(num_hidden_layers=num_layers, mtp_num_hidden_layers=0,
                                     layer_scan="scan")
        model = Qwen3NextModel(config, rngs=nnx.Rngs(0))
        graph, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, ids: nnx.merge(graph, s)(ids).logits)(
            state, jnp.zeros((1, 8), jnp.int32))
        return str(jaxpr).count("dot_general")

    assert count_dots(4) == count_dots(16)


def test_unrolled_blocks_equal_the_scanned_loop(tiny_config):
    """`layer_scan: unroll` (CPU's default) and `scan` give the same logits and gradients."""
    ids = jnp.asarray(np.random.default_rng(5).integers(0, tiny_config.vocab_size, (2, 16)))
    model = Qwen3NextModel(tiny_config, rngs=nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)

    def loss_and_grads(layer_scan):
        graph, _ = nnx.split(Qwen3NextModel(tiny_config.replace(layer_scan=layer_scan),
                                            rngs=nnx.Rngs(0)), nnx.Param)
        loss = lambda p: jnp.sum(jnp.sin(nnx.merge(graph, p)(ids).logits))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (scanned, scanned_grads), (unrolled, unrolled_grads) = (
        loss_and_grads("scan"), loss_and_grads("unroll"))
    np.testing.assert_allclose(unrolled, scanned, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(unrolled_grads), jax.tree.leaves(scanned_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_give_the_same_gradients(tiny_config, policy):
    ids = jnp.asarray(np.random.default_rng(3).integers(0, tiny_config.vocab_size, (1, 16)))

    def grads(config):
        model = stressed_model(config, seed=2, scale=2.0)
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(graph, p, rest)(ids).logits ** 2)
        return jax.jit(jax.grad(loss))(params)

    plain, remat = grads(tiny_config), grads(tiny_config.replace(remat_policy=policy))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        # Recomputation may fuse differently (the custom VJPs recompute inside a checkpointed
        # layer): equal up to fp32 rounding, 3e-5 of each leaf's norm and largest entry (the
        # largest seen: 1.0e-5, an 8-entry leaf; a remat bug would show at O(1)).
        assert np.linalg.norm(b - a) <= 3e-5 * np.linalg.norm(a) + 1e-12
        np.testing.assert_allclose(b, a, rtol=0, atol=3e-5 * float(jnp.abs(a).max()) + 1e-12)


def test_bfloat16_compute_tracks_fp32(tiny_config):
    """bf16 parity is statistical (spec section 9): tight without routing, argmax with it."""
    ids = jnp.asarray(np.random.default_rng(4).integers(0, tiny_config.vocab_size, (2, 70)))

    def both(config):
        fp32 = stressed_model(config, scale=1.0)(ids)
        bf16 = stressed_model(config.replace(dtype="bfloat16"), scale=1.0)(ids)
        return fp32.logits, bf16

    dense = tiny_config.replace(num_experts=0, mtp_num_hidden_layers=0)
    fp32, bf16 = both(dense)
    assert bf16.logits.dtype == jnp.float32 and bf16.hidden.dtype == jnp.bfloat16
    assert relative_error(bf16.logits, fp32) < 2e-2
    fp32, bf16 = both(tiny_config)  # top-k routing flips on near-ties move whole tokens
    assert np.mean(np.argmax(bf16.logits, -1) == np.argmax(fp32, -1)) > 0.95



def test_pallas_delta_rule_inside_the_model(tiny_config):
    """The model with the Pallas kernels (interpret mode here) gives the logits and parameter
    gradients of the XLA chunked rule, on packed rows."""
    config = tiny_config.replace(num_hidden_layers=4, mtp_num_hidden_layers=0)
    _, state = nnx.split(stressed_model(config))
    tokens = jax.random.randint(jax.random.key(3), (2, 40), 0, config.vocab_size)
    segments = jnp.concatenate([jnp.ones((2, 23), jnp.int32), 2 * jnp.ones((2, 17), jnp.int32)], 1)
    results = {}
    for impl in ("chunked", "pallas"):
        abstract = nnx.eval_shape(
            lambda impl=impl: Qwen3NextModel(config.replace(delta_rule_impl=impl), rngs=nnx.Rngs(0))
        )
        graph = nnx.split(abstract)[0]

        def loss(state, graph=graph):
            logits = nnx.merge(graph, state)(tokens, segment_ids=segments).logits
            return jnp.mean(logits ** 2), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
        results[impl] = (logits, jax.tree.leaves(grads))
    assert relative_error(results["pallas"][0], results["chunked"][0]) < 1e-5
    for got, ref in zip(results["pallas"][1], results["chunked"][1]):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * float(np.max(np.abs(ref))))
