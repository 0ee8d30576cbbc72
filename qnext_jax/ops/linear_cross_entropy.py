"""The LM head and cross-entropy fused over token chunks: exact, without ever holding the logits.

    loss[b, t] = logsumexp_v(h[b, t] . W[:, v]) - h[b, t] . W[:, target[b, t]]

The plain head materialises fp32 logits [B, T, V] and autodiff keeps them (and their gradient)
for the backward pass: for Qwen3-Next's 151,936-token vocabulary that is 2.4 GB per 4K-token
row, once more per MTP depth. Here the forward walks over chunks of tokens, keeping only each
token's logsumexp; the backward recomputes one chunk's logits at a time and turns them into
the chunk's hidden-state gradient and its share of the weight gradient. Peak memory is one
chunk's logits, [chunk, V] fp32, whatever the sequence length (with the weight's width sharded,
one vocabulary block's: below). When every token fits in one
chunk (on one device) the backward reuses the forward's logits instead of recomputing them.

Our own custom VJP, because no maintained library does this where we run: tokamax's
`linear_softmax_cross_entropy_loss` is tiled only on TPU (its XLA form, used on CPU and GPU,
materialises the logits), takes no per-token mask, and returns a per-shard logsumexp when the
vocabulary is sharded, so its gradients would be wrong under tensor parallelism.

Under a mesh (`sharding`, which the caller reads off its sharding table) the forward and the
backward are each one `shard_map`: every device takes its own tokens (batch and sequence
shards) and its slice of the vocabulary (as the head weight is sharded); the logsumexp and the
target logit are combined over `tensor` (a vocabulary-parallel cross-entropy) and the
hidden-state gradient is summed over `tensor`. When the weight's width is sharded too (FSDP and
the other parameter axes) both passes walk over blocks of the vocabulary instead of chunks of
tokens: each block of the weight is gathered, used, and its fp32 gradient reduce-scattered over
the width axes (summed over the other token shards) on its own, so no device ever holds the
whole weight or the whole fp32 [E, V/tensor] gradient sum (1.2 GB for the 80B).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

# A chunk's fp32 logits are about this many elements (64 MiB) unless asked otherwise, and at
# least _MIN_CHUNK_TOKENS rows, so that the chunk's matmuls stay large.
_CHUNK_LOGITS_ELEMENTS = 1 << 24
_MIN_CHUNK_TOKENS = 256


class HeadSharding(NamedTuple):
    """The mesh axes (a name, a tuple of names, or None) of the ambient mesh that split the
    rows, the positions, the vocabulary, and the weight's width (FSDP: gathered on use, its
    gradient reduce-scattered; axes that also split the tokens)."""

    rows: str | tuple[str, ...] | None
    positions: str | tuple[str, ...] | None
    vocab: str | tuple[str, ...] | None
    width: str | tuple[str, ...] | None = None


def linear_cross_entropy(hidden, weight, targets, *, vocab_major: bool,
                         chunk_tokens: int | None = None, sharding: HeadSharding | None = None):
    """-log softmax(hidden @ W)[target] per token, in fp32, without materialising the logits.

    hidden: [B, T, E] (the compute dtype); targets: [B, T] int in [0, V).
    weight: [V, E] when `vocab_major` (a tied embedding table), else [E, V] (an LM head); the
        logits are accumulated in fp32 from operands in the compute dtype, as the plain head.
    chunk_tokens: tokens per chunk on each device; None keeps a chunk's logits near 64 MiB.
        With the weight's width sharded it sizes the vocabulary blocks instead (a block's
        logits, [tokens, columns], about as many as a chunk's, [chunk_tokens, V]).
    sharding: how the ambient mesh splits tokens and vocabulary; None: one device.
    Returns [B, T] fp32; differentiable in `hidden` and `weight`.
    """
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be [B, T, E] and targets [B, T]; got {hidden.shape} "
                         f"and {targets.shape}")
    width = weight.shape[1] if vocab_major else weight.shape[0]
    if weight.ndim != 2 or width != hidden.shape[2]:
        layout = "[V, E]" if vocab_major else "[E, V]"
        raise ValueError(f"weight must be {layout} with E = {hidden.shape[2]}; got {weight.shape}")
    return _fused(hidden, weight, targets.astype(jnp.int32), vocab_major, chunk_tokens, sharding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(hidden, weight, targets, vocab_major, chunk_tokens, sharding):
    return _forward(hidden, weight, targets, vocab_major, chunk_tokens, sharding)[0]


def _fused_fwd(hidden, weight, targets, vocab_major, chunk_tokens, sharding):
    keep = _keeps_logits(hidden, weight, vocab_major, chunk_tokens, sharding)
    loss, lse, logits = _forward(hidden, weight, targets, vocab_major, chunk_tokens, sharding,
                                 keep=keep)
    return loss, (hidden, weight, targets, lse, logits)


def _fused_bwd(vocab_major, chunk_tokens, sharding, residuals, loss_grad):
    hidden, weight, targets, lse, logits = residuals
    grad_hidden, grad_weight = _backward(hidden, weight, targets, lse, loss_grad,
                                         vocab_major, chunk_tokens, sharding, logits)
    return grad_hidden, grad_weight, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _keeps_logits(hidden, weight, vocab_major, chunk_tokens, sharding) -> bool:
    """On one device, when every token fits in one chunk, the forward's logits are kept for
    the backward instead of recomputed: the peak is the same one chunk of logits (it just lives
    until the backward), and the head's matmuls drop from four to three."""
    tokens = hidden.shape[0] * hidden.shape[1]
    return (sharding is None
            and _chunk_size(tokens, _vocab(weight, vocab_major), chunk_tokens) == tokens)


class _Axes:
    """Mesh axes the computation is split over (empty on one device)."""

    def __init__(self, sharding: HeadSharding | None):
        if sharding is None:
            self.tokens, self.vocab, self.width = (), (), ()
            self.hidden = self.rows = self.weights = None
            return
        rows, positions, vocab, width = sharding
        self.tokens = _names(rows) + _names(positions)
        self.vocab = _names(vocab)
        self.width = _names(width)
        if not set(self.width) <= set(self.tokens):
            raise ValueError(f"the head weight's width axes {self.width} must split the tokens "
                             f"too ({self.tokens})")
        self.hidden = PartitionSpec(rows, positions, None)
        self.rows = PartitionSpec(rows, positions)
        self.weights = {True: PartitionSpec(vocab, width), False: PartitionSpec(width, vocab)}

    def weight_spec(self, vocab_major):
        return None if self.weights is None else self.weights[vocab_major]

    def run(self, fn, in_specs, out_specs):
        if not self.tokens and not self.vocab:
            return fn
        return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs,
                             out_specs=out_specs, check_vma=False)

    def gather_width(self, weight, vocab_major):
        """The weight with its whole width (gathered over the axes that shard it)."""
        if not self.width:
            return weight
        return jax.lax.all_gather(weight, self.width, axis=int(vocab_major), tiled=True)

    def reduce_weight_grad(self, grad, vocab_major):
        """Each device's fp32 weight gradient -> its shard of the sum over every token shard."""
        grad = _sum_over(tuple(a for a in self.tokens if a not in self.width), grad)
        if not self.width:
            return grad
        return jax.lax.psum_scatter(grad, self.width, scatter_dimension=int(vocab_major),
                                    tiled=True)

    def vocab_index(self):
        """This device's position along the vocabulary shards (0 without any)."""
        index = 0
        for name in self.vocab:
            index = index * jax.lax.axis_size(name) + jax.lax.axis_index(name)
        return index


def _forward(hidden, weight, targets, vocab_major, chunk_tokens, sharding, keep=False):
    """(loss, lse, the chunks' logits [N, C, V] when `keep`, else None)."""
    axes = _Axes(sharding)

    def local(hidden, weight, targets):  # the weight's width whole here (unsharded)
        chunk, unchunk = _chunker(hidden, weight, vocab_major, chunk_tokens)
        offset = axes.vocab_index() * _vocab(weight, vocab_major)

        def chunk_loss(_, block):
            h, target = block
            logits = _logits(h, weight, vocab_major)  # [C, V_local] fp32
            top = _max_over(axes.vocab, jnp.max(logits, axis=-1))
            total = _sum_over(axes.vocab, jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
            lse = top + jnp.log(total)
            loss = lse - _target_logit(logits, target, offset, axes.vocab)
            return None, (loss, lse, logits) if keep else (loss, lse)

        _, outputs = jax.lax.scan(chunk_loss, None, (chunk(hidden), chunk(targets)))
        return unchunk(outputs[0]), unchunk(outputs[1]), outputs[2] if keep else None

    if keep:  # on one device only
        return local(hidden, weight, targets)
    per_device = local if not axes.width else functools.partial(
        _forward_by_vocab_blocks, axes=axes, vocab_major=vocab_major, chunk_tokens=chunk_tokens)
    weight_spec = axes.weight_spec(vocab_major)
    return axes.run(per_device, (axes.hidden, weight_spec, axes.rows),
                    (axes.rows, axes.rows, None))(
        hidden, weight, targets)


def _backward(hidden, weight, targets, lse, loss_grad, vocab_major, chunk_tokens, sharding,
              kept=None):
    """kept: the forward's logits [N, C, V] (then not recomputed), or None."""
    axes = _Axes(sharding)

    def local(hidden, weight, targets, lse, loss_grad):  # the weight's width whole here
        chunk, unchunk = _chunker(hidden, weight, vocab_major, chunk_tokens)
        vocab = _vocab(weight, vocab_major)
        offset = axes.vocab_index() * vocab
        operand_dtype = hidden.dtype

        def chunk_grads(grad_weight, block):
            h, target, chunk_lse, g, *saved = block
            logits = saved[0] if saved else _logits(h, weight, vocab_major)
            local_target = target - offset
            one_hot = (local_target[:, None] == jnp.arange(vocab)[None, :]).astype(jnp.float32)
            grad_logits = (jnp.exp(logits - chunk_lse[:, None]) - one_hot) * g[:, None]
            grad_logits = grad_logits.astype(operand_dtype)
            spec = "CV,VE->CE" if vocab_major else "CV,EV->CE"
            grad_h = jnp.einsum(spec, grad_logits, weight, preferred_element_type=jnp.float32)
            spec = "CV,CE->VE" if vocab_major else "CV,CE->EV"
            grad_weight += jnp.einsum(spec, grad_logits, h, preferred_element_type=jnp.float32)
            return grad_weight, _sum_over(axes.vocab, grad_h)

        grad_weight, grad_h = jax.lax.scan(
            chunk_grads, jnp.zeros(weight.shape, jnp.float32),
            tuple(chunk(x) for x in (hidden, targets, lse, loss_grad)) + (
                () if kept is None else (kept,)))
        grad_weight = axes.reduce_weight_grad(grad_weight, vocab_major)
        return unchunk(grad_h).astype(hidden.dtype), grad_weight.astype(weight.dtype)

    per_device = local if not axes.width else functools.partial(
        _backward_by_vocab_blocks, axes=axes, vocab_major=vocab_major, chunk_tokens=chunk_tokens)
    weight_spec = axes.weight_spec(vocab_major)
    rows = axes.rows
    return axes.run(per_device, (axes.hidden, weight_spec, rows, rows, rows),
                    (axes.hidden, weight_spec))(hidden, weight, targets, lse, loss_grad)


# With the weight's width sharded (FSDP and the other parameter axes), the token chunks above
# would gather the whole weight and accumulate a whole fp32 [E, V/tensor] gradient on every
# device before reducing it: for the 80B 1.16 GiB a head, held by XLA:TPU past the head while
# its reduction overlaps the last layers' backward (both heads' at the 262K peak). Walking
# over blocks of the vocabulary instead, each block of the weight is gathered, used and
# its gradient reduced on its own: no device holds more than one [E, block] of either. Every
# block sees every token of the device, so the forward's logsumexp is accumulated online.


def _vocab_blocks(tokens, vocab, chunk_tokens):
    """(blocks, columns a block): about as many logits a block ([tokens, columns] fp32) as a
    token chunk has ([chunk, vocab]); whole 128-lane tiles once the blocks are that wide."""
    elements = vocab * chunk_tokens if chunk_tokens else _CHUNK_LOGITS_ELEMENTS
    count = -(-vocab // max(1, elements // tokens))
    columns = -(-vocab // count)
    if columns >= 128:
        columns = -(-columns // 128) * 128
    return -(-vocab // columns), columns


def _weight_blocks(weight, vocab_major, count, columns):
    """The local weight [V, E_w] / [E_w, V] -> [count, columns, E_w] / [count, E_w, columns],
    padded with zero columns past the vocabulary."""
    vocab_axis = 0 if vocab_major else 1
    pad = [(0, 0), (0, 0)]
    pad[vocab_axis] = (0, count * columns - weight.shape[vocab_axis])
    weight = jnp.pad(weight, pad)
    if vocab_major:
        return weight.reshape(count, columns, weight.shape[1])
    return weight.reshape(weight.shape[0], count, columns).transpose(1, 0, 2)


class _Blocks(NamedTuple):
    """One device's tokens and its vocabulary shard cut into blocks of columns."""

    h: jnp.ndarray  # [n, E] the device's hidden states
    column: jnp.ndarray  # [n] each target's column in this vocabulary shard, -1 if elsewhere
    vocab: int  # the shard's columns (without padding)
    count: int
    columns: int
    weights: jnp.ndarray  # the weight shard in blocks (_weight_blocks)

    def in_block(self, index):
        """(which columns of block `index` are real, each target's column in it or -1)."""
        start = index * self.columns
        real = start + jnp.arange(self.columns) < self.vocab  # padding takes no part
        return real, jnp.where(self.column >= 0, self.column - start, -1)


def _blocks(hidden, weight, targets, axes, vocab_major, chunk_tokens) -> _Blocks:
    h, target = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    vocab = _vocab(weight, vocab_major)
    count, columns = _vocab_blocks(h.shape[0], vocab, chunk_tokens)
    offset = axes.vocab_index() * vocab
    column = jnp.where((target >= offset) & (target < offset + vocab), target - offset, -1)
    return _Blocks(h, column, vocab, count, columns,
                   _weight_blocks(weight, vocab_major, count, columns))


def _forward_by_vocab_blocks(hidden, weight, targets, *, axes, vocab_major, chunk_tokens):
    blocks = _blocks(hidden, weight, targets, axes, vocab_major, chunk_tokens)
    h, columns = blocks.h, blocks.columns

    def block_step(carry, block):
        top, total, target_logit = carry
        index, w = block
        logits = _logits(h, axes.gather_width(w, vocab_major), vocab_major)  # [n, columns]
        real, local = blocks.in_block(index)
        logits = jnp.where(real, logits, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
        total = (total * jnp.exp(top - new_top)
                 + jnp.sum(jnp.exp(logits - new_top[:, None]), axis=-1))
        held = (local >= 0) & (local < columns)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, columns - 1)[:, None], axis=-1)
        target_logit += jnp.where(held, picked[:, 0], 0.0)
        return (new_top, total, target_logit), None

    start = (jnp.full(h.shape[:1], -jnp.inf, jnp.float32), jnp.zeros(h.shape[:1], jnp.float32),
             jnp.zeros(h.shape[:1], jnp.float32))
    (top, total, target_logit), _ = jax.lax.scan(
        block_step, start, (jnp.arange(blocks.count), blocks.weights))
    # Combined over the vocabulary shards (tensor) as the token chunks do.
    global_top = _max_over(axes.vocab, top)
    lse = global_top + jnp.log(_sum_over(axes.vocab, total * jnp.exp(top - global_top)))
    loss = lse - _sum_over(axes.vocab, target_logit)
    return loss.reshape(targets.shape), lse.reshape(targets.shape), None


def _backward_by_vocab_blocks(hidden, weight, targets, lse, loss_grad, *, axes, vocab_major,
                              chunk_tokens):
    blocks = _blocks(hidden, weight, targets, axes, vocab_major, chunk_tokens)
    h, count, columns, vocab = blocks.h, blocks.count, blocks.columns, blocks.vocab
    lse, g = lse.reshape(-1), loss_grad.reshape(-1)

    def block_grads(grad_h, block):
        index, w = block
        w = axes.gather_width(w, vocab_major)
        logits = _logits(h, w, vocab_major)
        real, local = blocks.in_block(index)
        one_hot = (local[:, None] == jnp.arange(columns)[None, :]).astype(jnp.float32)
        probs = jnp.where(real, jnp.exp(logits - lse[:, None]), 0.0)
        grad_logits = ((probs - one_hot) * g[:, None]).astype(h.dtype)
        spec = "CV,VE->CE" if vocab_major else "CV,EV->CE"
        grad_h += jnp.einsum(spec, grad_logits, w, preferred_element_type=jnp.float32)
        spec = "CV,CE->VE" if vocab_major else "CV,CE->EV"
        grad_w = jnp.einsum(spec, grad_logits, h, preferred_element_type=jnp.float32)
        return grad_h, axes.reduce_weight_grad(grad_w, vocab_major).astype(weight.dtype)

    grad_h, grad_blocks = jax.lax.scan(
        block_grads, jnp.zeros(h.shape, jnp.float32), (jnp.arange(count), blocks.weights))
    if vocab_major:  # [count, columns, E_w] -> [V, E_w]
        grad_weight = grad_blocks.reshape(count * columns, -1)[:vocab]
    else:  # [count, E_w, columns] -> [E_w, V]
        grad_weight = grad_blocks.transpose(1, 0, 2).reshape(-1, count * columns)[:, :vocab]
    grad_h = _sum_over(axes.vocab, grad_h)
    return grad_h.astype(hidden.dtype).reshape(hidden.shape), grad_weight


def _logits(h, weight, vocab_major):
    spec = "CE,VE->CV" if vocab_major else "CE,EV->CV"
    return jnp.einsum(spec, h, weight.astype(h.dtype), preferred_element_type=jnp.float32)


def _target_logit(logits, target, offset, vocab_axes):
    """logits[i, target[i]] where this device holds that column, combined over the shards."""
    local = target - offset
    held = (local >= 0) & (local < logits.shape[-1])
    value = jnp.take_along_axis(logits, jnp.clip(local, 0, logits.shape[-1] - 1)[:, None],
                                axis=-1)[:, 0]
    return _sum_over(vocab_axes, jnp.where(held, value, 0.0))


def _vocab(weight, vocab_major):
    return weight.shape[0] if vocab_major else weight.shape[1]


def _chunk_size(tokens, vocab, chunk_tokens):
    if chunk_tokens is None:
        chunk_tokens = max(_MIN_CHUNK_TOKENS,
                           1 << int(math.log2(max(_CHUNK_LOGITS_ELEMENTS // vocab, 1))))
    return min(chunk_tokens, tokens)


def _chunker(hidden, weight, vocab_major, chunk_tokens):
    """(chunk, unchunk): `chunk` flattens [B, T, ...] arrays of this device's tokens into
    chunks [N, C, ...], padding the last with zeros (token 0, whose loss is dropped and whose
    gradient is zero); `unchunk` is its inverse for [N, C, ...]."""
    rows, length = hidden.shape[:2]
    tokens = rows * length
    size = _chunk_size(tokens, _vocab(weight, vocab_major), chunk_tokens)
    count = -(-tokens // size)

    def chunk(x):
        flat = x.reshape(tokens, *x.shape[2:])
        flat = jnp.pad(flat, [(0, count * size - tokens)] + [(0, 0)] * (x.ndim - 2))
        return flat.reshape(count, size, *x.shape[2:])

    def unchunk(x):
        return x.reshape(count * size, *x.shape[2:])[:tokens].reshape(rows, length, *x.shape[2:])

    return chunk, unchunk


def _names(part) -> tuple[str, ...]:
    if part is None:
        return ()
    return (part,) if isinstance(part, str) else tuple(part)


def _sum_over(axes, x):
    return jax.lax.psum(x, axes) if axes else x


def _max_over(axes, x):
    return jax.lax.pmax(x, axes) if axes else x
