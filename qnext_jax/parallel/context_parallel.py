"""Context parallelism: each row's tokens split into contiguous shards over the `sequence` axis.

The functions here run inside a `shard_map` in which `sequence` is manual: every device holds
tokens [i * t, (i + 1) * t) of its rows, and document indices (ops.segments.document_index)
computed over the whole row, so that equal indices on two devices mean the same document.

  causal conv     each shard needs the previous shard's last kernel-1 inputs: one `ppermute`
                  halo, masked at document boundaries like any other tap;
  delta rule      the state recurrence is affine in the state. Each shard runs its tokens once
                  from the zero state and (in the same pass, as extra value columns) from the
                  identity, which gives its transition S_out = M S_in + S_local; the shards'
                  (M, S_local) are all-gathered, every device folds them in order to get the
                  state entering its shard, and reruns its tokens from that state. A shard whose
                  first token starts a new document takes no state in, and M is zero past any
                  reset inside a shard, so packed rows stay exact;
  attention       keys, values and their document indices are all-gathered; the queries keep
                  their global positions for the causal mask, and move to the zig-zag order
                  (shard s attends chunks s and 2P-1-s of 2P) so every shard does the same
                  causal work.

Communication per layer (docs/long_context.md has the numbers for the 80B): the conv halo is
(kernel-1) tokens from one neighbour; the delta-rule exchange is P * Hv * dk * (dk + dv) fp32
per row, independent of the sequence length; attention gathers the row's keys and values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qnext_jax.ops.causal_attention import causal_attention
from qnext_jax.ops.causal_conv import causal_conv_silu

SEQUENCE = "sequence"
_NO_DOCUMENT = -1  # the document index of the tokens before a row's first shard


def shard_count() -> int:
    return jax.lax.axis_size(SEQUENCE)


def shard_index():
    return jax.lax.axis_index(SEQUENCE)


def from_previous_shard(x, width: int, fill):
    """x[:, -width:] of the previous sequence shard ([B, width, ...]); `fill` on shard 0."""
    count = shard_count()
    tail = x[:, -width:]
    if count == 1:
        return jnp.full_like(tail, fill)
    moved = jax.lax.ppermute(tail, SEQUENCE, [(i, i + 1) for i in range(count - 1)])
    return jnp.where(shard_index() == 0, jnp.asarray(fill, x.dtype), moved)


def gather_sequence(x):
    """[B, t, ...] on each shard -> [B, P * t, ...], the whole row, on every shard."""
    if shard_count() == 1:
        return x
    return jax.lax.all_gather(x, SEQUENCE, axis=1, tiled=True)


def conv_silu_across_shards(x, kernel, docs):
    """The DeltaNet short conv + SiLU of this shard's tokens x [B, t, ...] (kernel [W, ...]),
    with the previous shard's last W-1 inputs as the halo; docs [B, t] global indices."""
    width = kernel.shape[0]
    if shard_count() == 1 or width == 1:
        return causal_conv_silu(x, kernel, segment_ids=docs)
    if x.shape[1] < width - 1:
        raise ValueError(f"each sequence shard must hold at least conv kernel - 1 = {width - 1} "
                         f"tokens; it holds {x.shape[1]}")
    halo = from_previous_shard(x, width - 1, 0)
    halo_docs = from_previous_shard(docs, width - 1, _NO_DOCUMENT)
    out = causal_conv_silu(jnp.concatenate([halo, x], axis=1), kernel,
                           segment_ids=jnp.concatenate([halo_docs, docs], axis=1))
    return out[:, width - 1:]


def delta_rule_across_shards(run, q, k, v, g, beta, docs, initial_state):
    """The gated delta rule of this shard's tokens given the whole row's: (out [B, t, Hv, dv],
    the row's final state [B, Hv, dk, dv], the same on every shard).

    run(q, k, v, g, beta, docs, initial_state) -> (out, final_state) is the single-device rule
    (any implementation); initial_state [B, Hv, dk, dv] fp32 is the row's, used by shard 0."""
    if shard_count() == 1:
        return run(q, k, v, g, beta, docs, initial_state)
    batch, length, value_heads, value_dim = v.shape
    key_dim = q.shape[-1]
    f32 = jnp.float32

    # One pass gives both S_local (value columns, zero start) and M (extra identity columns).
    identity = jnp.broadcast_to(jnp.eye(key_dim, dtype=f32), (batch, value_heads, key_dim, key_dim))
    start = jnp.concatenate([jnp.zeros_like(initial_state), identity], axis=-1)
    no_values = jnp.zeros((batch, length, value_heads, key_dim), v.dtype)
    _, end = run(q, k, jnp.concatenate([v, no_values], axis=-1), g, beta, docs, start)
    local_state, transition = end[..., :value_dim], end[..., value_dim:]

    # Does this shard's first token continue the previous shard's last document?
    continues = docs[:, 0] == from_previous_shard(docs, 1, _NO_DOCUMENT)[:, 0]
    continues = continues | (shard_index() == 0)  # the row's initial state feeds shard 0

    def fold(state, shard):
        transition, local_state, continues = shard
        entering = jnp.where(continues[:, None, None, None], state, 0.0)
        return jnp.einsum("bhij,bhjv->bhiv", transition, entering) + local_state, entering

    gathered = [jax.lax.all_gather(x, SEQUENCE) for x in (transition, local_state, continues)]
    final_state, entering = jax.lax.scan(fold, initial_state.astype(f32), tuple(gathered))
    out, _ = run(q, k, v, g, beta, docs, entering[shard_index()])
    return out, final_state


def _chunk_holder(chunk: int, count: int) -> int:
    """The shard that attends chunk `chunk` of the row's 2P in the zig-zag order."""
    return chunk if chunk < count else 2 * count - 1 - chunk


def _zigzag_permutations(count: int):
    """ppermute pairs moving each shard's first half (chunk 2i) and second half (chunk 2i + 1)
    to the shard that attends it. Each is a permutation: shards s and 2P-1-s differ in parity,
    so every shard receives exactly one even and one odd chunk."""
    first = [(i, _chunk_holder(2 * i, count)) for i in range(count)]
    second = [(i, _chunk_holder(2 * i + 1, count)) for i in range(count)]
    return first, second


def to_zigzag(x):
    """[B, t, ...] of this shard's contiguous tokens -> (chunk s, chunk 2P-1-s), each
    [B, t/2, ...]: the chunks shard s attends in the balanced order."""
    half = x.shape[1] // 2
    first, second = _zigzag_permutations(shard_count())
    from_first = jax.lax.ppermute(x[:, :half], SEQUENCE, first)
    from_second = jax.lax.ppermute(x[:, half:], SEQUENCE, second)
    even = shard_index() % 2 == 0  # chunk s is even: it came as a first half
    return (jnp.where(even, from_first, from_second), jnp.where(even, from_second, from_first))


def from_zigzag(low, high):
    """The inverse of to_zigzag: (chunk s, chunk 2P-1-s) -> [B, t, ...] contiguous tokens."""
    first, second = _zigzag_permutations(shard_count())
    invert = lambda pairs: [(dst, src) for src, dst in pairs]  # noqa: E731
    even = shard_index() % 2 == 0
    back_first = jax.lax.ppermute(jnp.where(even, low, high), SEQUENCE, invert(first))
    back_second = jax.lax.ppermute(jnp.where(even, high, low), SEQUENCE, invert(second))
    return jnp.concatenate([back_first, back_second], axis=1)


def zigzag_offsets(count: int, half: int):
    """The static global positions of query 0 of chunk s and of chunk 2P-1-s, by shard s."""
    low = tuple(s * half for s in range(count))
    high = tuple((2 * count - 1 - s) * half for s in range(count))
    return low, high


def attention_across_shards(q, k, v, docs, *, scale: float, impl: str = "auto",
                            zigzag: bool = True):
    """Attention of this shard's queries [B, t, N, D] over the whole row's keys.

    Causal attention of contiguous shards is unbalanced: shard i attends (i + 1/2) t keys a
    query, so the step waits for the last shard (2P-1 times the first's work). With `zigzag`
    (and t even) the queries are split into the row's 2P chunks and shard s attends chunks s
    and 2P-1-s — (2P+1)/2 t keys a query on every shard — moving two half-shards of queries
    (and their outputs back) by ppermute; the keys stay gathered in row order."""
    keys, values, key_docs = (gather_sequence(x) for x in (k, v, docs))
    count = shard_count()
    if count == 1:
        return causal_attention(q, keys, values, docs, key_docs, scale=scale, impl=impl)
    if not zigzag or q.shape[1] % 2:
        return causal_attention(q, keys, values, docs, key_docs, scale=scale, impl=impl,
                                shard=(shard_index(), count))
    low_offsets, high_offsets = zigzag_offsets(count, q.shape[1] // 2)
    (q_low, q_high), (docs_low, docs_high) = to_zigzag(q), to_zigzag(docs)
    out_low = causal_attention(q_low, keys, values, docs_low, key_docs, scale=scale, impl=impl,
                               offsets=(shard_index(), low_offsets))
    out_high = causal_attention(q_high, keys, values, docs_high, key_docs, scale=scale,
                                impl=impl, offsets=(shard_index(), high_offsets))
    return from_zigzag(out_low, out_high)
