"""A bf16 step computes what an fp32 step computes, to bf16 rounding of each value: sums over
many tokens (the embedding rows' gradient, the experts' gathers) run in fp32, routing decisions
come from fp32 logits, and parameters (the master weights) stay fp32.

References: float64 NumPy for the embedding rows; float64 NumPy top-k for the router; the same
step computed in fp32 for every other gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import REPO_ROOT
from qnext_jax.config import ConfigError
from qnext_jax.data.batch import batch_from_packed_rows
from qnext_jax.model import Qwen3NextModel
from qnext_jax.model.moe import SparseMoE
from qnext_jax.ops.take_rows import take_rows, take_sorted_copies
from qnext_jax.train.losses import LossConfig, loss_terms, normalizers
from step_setup import MeshConfig, tiny_config, trainer_for

FREQUENT = 7  # the token that fills 70% of every skewed batch


def skewed_ids(rng, shape, vocab):
    return np.where(rng.random(shape) < 0.7, FREQUENT, rng.integers(0, vocab, shape))


def bf16_rounding_error(got, reference):
    """|got - reference| in units of one bf16 rounding of the reference (2^-8 relative)."""
    reference = np.asarray(reference, np.float64)
    scale = np.maximum(np.abs(reference), np.abs(reference).max() * 1e-3) * 2.0 ** -8
    return np.max(np.abs(np.asarray(got, np.float64) - reference) / scale)


@pytest.fixture(scope="module")
def bf16_config():
    return tiny_config(REPO_ROOT).replace(dtype="bfloat16")


def test_take_rows_sums_its_gradient_in_fp32():
    rng = np.random.default_rng(0)
    ids = skewed_ids(rng, (8192,), 64)
    table = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(0.5, 1.0, (8192, 16)), jnp.bfloat16)
    for dtype in (jnp.float32, jnp.bfloat16):  # an fp32 parameter, a bf16 activation
        grad = jax.grad(lambda t: jnp.vdot(take_rows(t.astype(dtype), ids, jnp.bfloat16)
                                           .astype(jnp.float32), cotangent.astype(jnp.float32))
                        )(table)
        expected = np.zeros((64, 16))
        np.add.at(expected, ids, np.asarray(cotangent, np.float64))
        assert bf16_rounding_error(grad, expected) <= 1.0, dtype


def test_take_sorted_copies_against_float64():
    """The MoE's rows sorted by expert (each token read once per choice, the first `kept`
    choices of the order): the value is the gather; the gradient sums each token's copies in
    fp32, without a scatter."""
    rng = np.random.default_rng(1)
    tokens, copies, width = 512, 10, 16
    table = jnp.asarray(rng.normal(size=(tokens, width)), jnp.bfloat16)
    full_order = np.argsort(rng.integers(0, 64, tokens * copies), kind="stable")
    for kept in (tokens * copies, 3000):  # every choice; the first 3,000 (the rest dropped)
        order = jnp.asarray(full_order[:kept])
        rows = take_sorted_copies(table, order, copies)
        np.testing.assert_array_equal(np.asarray(rows), np.asarray(table)[full_order[:kept] // copies])
        cotangent = jnp.asarray(rng.normal(0.5, 1.0, (kept, width)), jnp.bfloat16)
        grad = jax.grad(lambda t: jnp.vdot(take_sorted_copies(t, order, copies).astype(jnp.float32),
                                           cotangent.astype(jnp.float32)))(table)
        expected = np.zeros((tokens, width))
        np.add.at(expected, full_order[:kept] // copies, np.asarray(cotangent, np.float64))
        assert grad.dtype == jnp.bfloat16 and bf16_rounding_error(grad, expected) <= 1.0, kept
    with pytest.raises(ValueError, match="at most 5120 indices"):
        take_sorted_copies(table, jnp.zeros(5121, jnp.int32), copies)


@pytest.mark.parametrize("kept", [5120, 3000, 1000])  # gathered back; added in fp32
def test_sorted_permutations_ignore_rows_past_computed(kept):
    """take_sorted_copies' gradient and combine_sorted (values, rows' and weights' gradients)
    against float64 when only the first `computed` sorted rows are real and the rest hold NaN
    (a grouped matmul's unwritten rows): nothing past `computed` may reach a result."""
    from qnext_jax.ops.take_rows import combine_sorted

    rng = np.random.default_rng(2)
    tokens, copies, width = 512, 10, 16
    order = np.argsort(rng.integers(0, 64, tokens * copies), kind="stable")[:kept]
    computed = kept - 200
    rows = rng.normal(size=(kept, width))
    rows[computed:] = np.nan
    weights = rng.random((tokens, copies))
    cotangent = rng.normal(size=(tokens, width))
    args = (jnp.asarray(rows, jnp.bfloat16), jnp.asarray(weights, jnp.bfloat16))
    value, pull = jax.vjp(lambda r, w: combine_sorted(r, jnp.asarray(order), w,
                                                      jnp.int32(computed)), *args)
    grad_rows, grad_weights = pull(jnp.asarray(cotangent, jnp.bfloat16))

    r64, w64 = (np.asarray(a, np.float64) for a in args)
    c64 = np.asarray(jnp.asarray(cotangent, jnp.bfloat16), np.float64)
    expected, expected_rows, expected_weights = (np.zeros((tokens, width)), np.zeros_like(r64),
                                                 np.zeros((tokens, copies)))
    for p in range(computed):
        n, j = divmod(order[p], copies)
        expected[n] += w64[n, j] * r64[p]
        expected_rows[p] = w64[n, j] * c64[n]
        expected_weights[n, j] = r64[p] @ c64[n]
    assert bf16_rounding_error(value, expected) <= 1.0
    assert bf16_rounding_error(grad_rows, expected_rows) <= 1.0
    assert bf16_rounding_error(grad_weights, expected_weights) <= 1.0

    table = jnp.asarray(rng.normal(size=(tokens, width)), jnp.bfloat16)
    sorted_cotangent = args[0]  # NaN past `computed`
    _, pull = jax.vjp(lambda t: take_sorted_copies(t, jnp.asarray(order), copies,
                                                   jnp.int32(computed)), table)
    (grad,) = pull(sorted_cotangent)
    expected_table = np.zeros((tokens, width))
    np.add.at(expected_table, order[:computed] // copies, r64[:computed])
    assert bf16_rounding_error(grad, expected_table) <= 1.0


def test_embedding_rows_gradient_against_float64(bf16_config):
    """The lookup the main model and the MTP module share: 5,734 of 8,192 tokens read one row."""
    rng = np.random.default_rng(1)
    model = Qwen3NextModel(bf16_config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jnp.asarray(skewed_ids(rng, (8, 1024), bf16_config.vocab_size))
    cotangent = jnp.asarray(rng.normal(0.3, 1.0, (8, 1024, bf16_config.hidden_size)), jnp.bfloat16)

    def lookup(params):
        rows = nnx.merge(graphdef, params).embed_tokens(ids)
        assert rows.dtype == jnp.bfloat16
        return jnp.vdot(rows.astype(jnp.float32), cotangent.astype(jnp.float32))

    grad = jax.jit(jax.grad(lookup))(params)["embed"][...]
    assert grad.dtype == jnp.float32
    expected = np.zeros(grad.shape)
    np.add.at(expected, np.asarray(ids).reshape(-1),
              np.asarray(cotangent, np.float64).reshape(-1, bf16_config.hidden_size))
    assert bf16_rounding_error(grad, expected) <= 1.0


def test_router_chooses_the_experts_of_fp32_logits():
    """512 experts, top-10, normalised init (the 80B's router): every token's expert set equals
    the float64 top-10 of its logits, bar fp32 near-ties."""
    config = tiny_config(REPO_ROOT).replace(
        dtype="bfloat16", hidden_size=256, num_experts=512, num_experts_per_tok=10,
        moe_intermediate_size=8, shared_expert_intermediate_size=8)
    moe = SparseMoE(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    tokens = 4096
    x = jnp.asarray(rng.normal(size=(tokens, 1, config.hidden_size)), jnp.bfloat16)
    # One token per row: the per-row counts are each token's chosen set.
    _, stats = nnx.jit(lambda moe, x: moe(x))(moe, x)
    chosen = np.asarray(stats.row_expert_counts) > 0  # [tokens, 512]

    logits = np.asarray(x, np.float64)[:, 0] @ np.asarray(moe.router[...], np.float64)
    order = np.sort(logits, axis=-1)
    kth, next_ = order[:, -10], order[:, -11]
    decided = (kth - next_) > 1e-5 * np.abs(kth)  # not within fp32 rounding of a tie
    expected = logits >= kth[:, None]
    assert decided.mean() > 0.99
    assert np.array_equal(chosen[decided], expected[decided])


def test_router_dtype_compute_routes_in_the_compute_dtype_as_transformers():
    """For bf16 inference that must match transformers bit for bit: the router's matmul in the
    compute dtype; by default fp32 from the fp32 weights."""
    config = tiny_config(REPO_ROOT).replace(dtype="bfloat16")
    tokens = jnp.asarray(np.random.default_rng(4).normal(size=(16, config.hidden_size)),
                         jnp.bfloat16)
    for router_dtype, expected in (("float32", jnp.float32), ("compute", jnp.bfloat16)):
        moe = SparseMoE(config.replace(router_dtype=router_dtype), rngs=nnx.Rngs(0))
        logits, gate = moe.router_logits(tokens)
        assert logits.dtype == expected and gate.dtype == expected
        reference = np.asarray(tokens, np.float64) @ np.asarray(moe.router[...], np.float64)
        np.testing.assert_allclose(np.asarray(logits, np.float64), reference,
                                   rtol=2e-2 if expected == jnp.bfloat16 else 1e-5, atol=1e-3)


def grads_of_one_step(config, params_source, batch):
    graphdef, params = nnx.split(Qwen3NextModel(config, rngs=nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda _, value: value, params, params_source)

    def loss(params):
        model = nnx.merge(graphdef, params)
        output = model(batch.input_ids, positions=batch.positions,
                       segment_ids=batch.segment_ids, valid=batch.valid, logits=False)
        terms = loss_terms(output, batch, normalizers(batch, config.mtp_depth), LossConfig(),
                           config.router_aux_loss_coef, head=model.head_weight())
        return terms["loss"]

    return jax.jit(jax.grad(loss))(params)


def test_bf16_step_gradients_match_the_fp32_step(bf16_config):
    """Every parameter's gradient of a bf16 step (skewed tokens: the frequent token's rows
    gather over a thousand cotangents) against the same step computed in fp32. Each leaf is
    held to 3% plus four times its sensitivity, measured as how far the fp32 gradient moves when
    the parameters are rounded to bf16: a gradient that sums many terms of both signs (the
    layers' decay A_log, say) moves that much from rounding alone. A bf16 sum of the frequent
    token's cotangents lost 30-80% of the embedding row."""
    rng = np.random.default_rng(3)
    tokens = skewed_ids(rng, (4, 513), bf16_config.vocab_size)
    segments = np.ones_like(tokens)
    segments[:, 300:] = 2
    batch = batch_from_packed_rows(tokens, segments)
    fp32_config = bf16_config.replace(dtype="float32")
    _, params = nnx.split(Qwen3NextModel(fp32_config, rngs=nnx.Rngs(0)), nnx.Param)
    rounded = jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params)
    reference = grads_of_one_step(fp32_config, params, batch)
    moved = grads_of_one_step(fp32_config, rounded, batch)
    ours = grads_of_one_step(bf16_config, params, batch)

    def relative(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    for (path, got), expected, sensitive in zip(jax.tree_util.tree_leaves_with_path(ours),
                                                jax.tree.leaves(reference), jax.tree.leaves(moved)):
        assert got.dtype == jnp.float32
        error, bound = relative(got, expected), 0.03 + 4 * relative(sensitive, expected)
        assert error < bound, (jax.tree_util.keystr(path), error, bound)
    row = lambda grads: jax.tree.leaves(grads["embed"])[0][FREQUENT]  # noqa: E731
    assert relative(row(ours), row(reference)) < 0.01


def test_training_refuses_bf16_parameters(bf16_config):
    config = bf16_config.replace(param_dtype="bfloat16")
    model = Qwen3NextModel(config, rngs=nnx.Rngs(0))
    # The decay parameters stay fp32 whatever param_dtype says (as the loader keeps them).
    block = model.blocks.layers[0].mixer
    assert block.A_log[...].dtype == jnp.float32 and block.dt_bias[...].dtype == jnp.float32
    assert model.embed[...].dtype == jnp.bfloat16
    with pytest.raises(ConfigError, match="param_dtype=bfloat16 would train without fp32 master"):
        trainer_for(config, MeshConfig(fsdp=1), jax.devices()[:1])
