"""The fused LM head + cross-entropy against float64 NumPy: per-token losses and the gradients of
a weighted sum of them, for both weight layouts, one chunk (whose logits the backward keeps)
and chunk sizes that do and do not divide the token count (recomputed), and on 8-device meshes
with the vocabulary split over `tensor` and the weight's width over the parameter axes (padded
vocabulary blocks), in fp32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from qnext_jax.ops.linear_cross_entropy import linear_cross_entropy
from qnext_jax.parallel.axes import head_sharding
from qnext_jax.parallel.mesh import MeshConfig, make_mesh

B, T, E, V = 4, 12, 16, 50  # V: padded vocabulary blocks on the meshes


def numpy_reference(hidden, weight, targets, loss_grad, vocab_major):
    """Losses and the gradients of sum(loss * loss_grad), written out in float64."""
    h, w = np.asarray(hidden, np.float64), np.asarray(weight, np.float64)
    w = w.T if vocab_major else w  # [E, V]
    logits = h @ w
    top = logits.max(-1, keepdims=True)
    probs = np.exp(logits - top)
    lse = np.log(probs.sum(-1)) + top[..., 0]
    probs /= probs.sum(-1, keepdims=True)
    loss = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    grad_logits = (probs - np.eye(logits.shape[-1])[targets]) * np.asarray(loss_grad)[..., None]
    grad_h = grad_logits @ w.T
    grad_w = np.einsum("btv,bte->ev", grad_logits, h)
    return loss, grad_h, grad_w.T if vocab_major else grad_w


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(B, T, E)), jnp.float32)
    weight = jnp.asarray(0.5 * rng.normal(size=(E, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    loss_grad = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    return hidden, weight, targets, loss_grad


def losses_and_grads(hidden, weight, targets, loss_grad, **kwargs):
    def weighted(h, w):
        loss = linear_cross_entropy(h, w, targets, **kwargs)
        return jnp.sum(loss * loss_grad), loss

    (_, loss), grads = jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True)(hidden, weight)
    return loss, *grads


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("chunk_tokens", [None, 5, 16])
def test_matches_numpy(inputs, vocab_major, chunk_tokens):
    hidden, weight, targets, loss_grad = inputs
    weight = weight.T if vocab_major else weight
    got = losses_and_grads(hidden, weight, targets, loss_grad, vocab_major=vocab_major,
                           chunk_tokens=chunk_tokens)
    expected = numpy_reference(hidden, weight, np.asarray(targets), loss_grad, vocab_major)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, expected):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("vocab_major", [False, True])
@pytest.mark.parametrize("layout", [dict(data=2, fsdp=2, expert=1, tensor=2),
                                    dict(data=1, fsdp=2, expert=2, sequence=2, tensor=1)])
def test_vocabulary_parallel_on_a_mesh_equals_one_device(inputs, vocab_major, layout):
    """The vocabulary over `tensor`, tokens over rows and sequence shards, the weight's width
    over the parameter axes (fsdp x sequence x expert): its gradient is reduce-scattered."""
    hidden, weight, targets, loss_grad = inputs
    weight = weight.T if vocab_major else weight
    kwargs = dict(vocab_major=vocab_major, chunk_tokens=5)
    single = losses_and_grads(hidden, weight, targets, loss_grad, **kwargs)

    mesh = make_mesh(MeshConfig(**layout))
    rows = NamedSharding(mesh, P(("data", "fsdp", "expert"), "sequence"))
    acts = NamedSharding(mesh, P(("data", "fsdp", "expert"), "sequence", None))
    width = ("fsdp", "sequence", "expert")
    weights = NamedSharding(mesh, P("tensor", width) if vocab_major else P(width, "tensor"))

    @jax.jit
    def sharded(hidden, weight, targets, loss_grad):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return losses_and_grads(hidden, weight, targets, loss_grad, **kwargs,
                                    sharding=head_sharding())

    placed = [jax.device_put(x, s) for x, s in
              zip((hidden, weight, targets, loss_grad), (acts, weights, rows, rows))]
    assert "reduce_scatter" in sharded.lower(*placed).as_text()  # the weight's gradient
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), sharded(*placed), single):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("layout", [dict(data=1, fsdp=2, expert=2, sequence=2, tensor=1),
                                    dict(data=2, fsdp=2, expert=1, tensor=2)])
def test_bf16_on_a_mesh_matches_numpy(inputs, layout):
    """The dtype training uses: bf16 hidden states and head weight, the width sharded (vocabulary
    blocks), against float64 NumPy on the same bf16 values. The products' operands are bf16
    (the logits' gradient is rounded once), their sums fp32."""
    hidden, weight, targets, loss_grad = inputs
    hidden, weight = hidden.astype(jnp.bfloat16), weight.astype(jnp.bfloat16)
    mesh = make_mesh(MeshConfig(**layout))
    acts = NamedSharding(mesh, P(("data", "fsdp", "expert"), "sequence", None))
    rows = NamedSharding(mesh, P(("data", "fsdp", "expert"), "sequence"))
    weights = NamedSharding(mesh, P(("fsdp", "sequence", "expert"), "tensor"))

    @jax.jit
    def sharded(hidden, weight, targets, loss_grad):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return losses_and_grads(hidden, weight, targets, loss_grad, vocab_major=False,
                                    chunk_tokens=5, sharding=head_sharding())

    placed = [jax.device_put(x, s) for x, s in
              zip((hidden, weight, targets, loss_grad), (acts, weights, rows, rows))]
    got = sharded(*placed)
    assert got[1].dtype == got[2].dtype == jnp.bfloat16
    expected = numpy_reference(np.asarray(hidden, np.float64), np.asarray(weight, np.float64),
                               np.asarray(targets), loss_grad, vocab_major=False)
    for name, a, b in zip(("loss", "grad hidden", "grad weight"), got, expected):
        a = np.asarray(a, np.float64)
        scale = np.abs(b).max()
        assert np.abs(a - b).max() <= 1e-2 * scale, name


def test_bad_shapes_are_named(inputs):
    hidden, weight, targets, _ = inputs
    with pytest.raises(ValueError, match=r"weight must be \[V, E\]"):
        linear_cross_entropy(hidden, weight, targets, vocab_major=True)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:, 1:], vocab_major=False)
