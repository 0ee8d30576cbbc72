"""TPU attention through JAX's Pallas splash attention kernel, with documents as segment ids.

Splash (jax.experimental.pallas.ops.tpu.splash_attention) is the maintained TPU flash kernel
that has what the architecture needs: causal masking with a query offset, segment ids for
packed documents (we pass document indices, so reused raw ids stay apart), GQA without
repeating keys (query head n reads kv head n // G), head_dim 256, and its own backward.

Where the queries start at a traced offset (a sequence shard, a zig-zag chunk: 2P possible
starts on P shards) the kernel must serve every start. Splash keeps a mask in two parts: its
tables (which key blocks each query block visits, and the query positions) are arrays the
kernel reads, and its mask function is code. Our causal mask puts the start in the query
positions, so the kernels of all starts share their code and differ only in their tables.
The tables of up to `_MAX_KERNELS` groups of starts are stacked, each device indexes its own,
and one compiled kernel serves a group: the 80B at 262K tokens on 64 shards compiled 128
kernels (1.08 GiB of TPU code) when each start had its own. Splash shrinks each table to the
key blocks its queries visit; a group's tables are padded to the widest of its members, as
splash pads its own query shards (skipped blocks, no new fetches), so grouping starts of
similar width keeps the padded grid within 1 / `_MAX_KERNELS` of the widest.

Block sizes are multiples of 128 (the TPU lane width); other lengths fall back to the
blockwise XLA attention (ops/blockwise_attention.py), with the reason logged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

_LANES = 128
_MAX_BLOCK = 512
_MAX_KERNELS = 8  # compiled kernels for the possible query starts of one call


def splash_unsupported_reason(q_len: int, kv_len: int) -> str | None:
    """Why splash cannot run these lengths, or None."""
    for name, size in (("query", q_len), ("key", kv_len)):
        if size % _LANES:
            return f"the {name} length {size} is not a multiple of {_LANES}"
    return None


def splash_attention(q, k, v, q_docs, kv_docs, *, scale: float, offsets=None,
                     interpret: bool = False):
    """q [B, Tq, N, D]; k, v [B, Tk, K, D]; q_docs [B, Tq], kv_docs [B, Tk] document indices.
    offsets: (index, positions) when query 0 sits at positions[index] of the keys' row (index
    traced, positions static: a sequence shard or a zig-zag chunk), else None (queries and keys
    are the same tokens). Returns [B, Tq, N, D] in v's dtype."""
    q_len, heads = q.shape[1], q.shape[2]
    kv_len = k.shape[1]
    # Splash does not scale the scores; it takes heads first.
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q * jnp.asarray(scale, q.dtype), k, v))
    segments = kernel_lib.SegmentIds(q=q_docs.astype(jnp.int32), kv=kv_docs.astype(jnp.int32))

    def run(kernel):
        return jax.vmap(kernel)(q, k, v, segment_ids=segments)

    starts = (0,) if offsets is None else tuple(offsets[1])
    if len(starts) == 1:
        out = run(_kernel(heads, q_len, kv_len, starts[0], interpret))
    else:
        groups = _groups(starts)
        kernels = [[_kernel(heads, q_len, kv_len, starts[i], interpret) for i in group]
                   for group in groups]
        tables = [_stacked_tables(members) for members in kernels]
        group_of, member_of = np.zeros(len(starts), np.int32), np.zeros(len(starts), np.int32)
        for g, group in enumerate(groups):
            group_of[group], member_of[group] = g, np.arange(len(group))
        index = offsets[0]

        def branch(treedef, stacked):
            def pick(member):
                leaves = [table[member] for table in stacked]
                return run(jax.tree_util.tree_unflatten(treedef, leaves))
            return pick

        out = jax.lax.switch(jnp.asarray(group_of)[index],
                             [branch(*table) for table in tables],
                             jnp.asarray(member_of)[index])
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)


def _causal(q_positions, kv_positions):
    return q_positions >= kv_positions


class _CausalFrom(mask_lib.CausalMask):
    """Causal attention for queries at key positions start, start + 1, ...: the start is in
    the query positions (a table the kernel reads), the mask function is one shared function
    (code): kernels for different starts compile to the same program."""

    def __init__(self, shape: tuple[int, int], start: int):
        super().__init__(shape)
        self.q_sequence = np.arange(start, start + shape[0], dtype=np.int32)
        self.mask_function = _causal

    def __getitem__(self, idx) -> np.ndarray:
        """A block of the mask. Splash classifies every block (empty, full, partial) by
        evaluating it whole: O(T^2) for keys of length T, minutes of tracing per call at 262K.
        A block whose last query precedes its first key is empty and one whose first query
        follows its last key is full; both come back as one element (splash only asks them
        any() and all()), and only the blocks on the diagonal are evaluated."""
        q_slice, kv_slice = idx
        queries = self.q_sequence[q_slice]
        first_key, end_key, _ = kv_slice.indices(self.shape[1])
        if len(queries) and end_key > first_key:
            if queries[0] >= end_key - 1:
                return np.ones((1, 1), np.bool_)
            if queries[-1] < first_key:
                return np.zeros((1, 1), np.bool_)
        return super().__getitem__(idx)


def _kernel(heads: int, q_len: int, kv_len: int, start: int, interpret: bool):
    # Built per trace, not cached: the kernel holds its mask tables as jax arrays, and a kernel
    # reused in a later trace hands them to it as captured constants (which jax.export rejects).
    mask = mask_lib.MultiHeadMask([_CausalFrom((q_len, kv_len), start)] * heads)
    block_q, block_kv = _block(q_len), _block(kv_len)
    sizes = kernel_lib.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv)
    return kernel_lib.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                      interpret=interpret)


def _groups(starts) -> list[list[int]]:
    """Indices of `starts` in at most _MAX_KERNELS groups of neighbouring starts (similar
    causal widths, so little padding)."""
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    size = math.ceil(len(order) / _MAX_KERNELS)
    return [order[i:i + size] for i in range(0, len(order), size)]


def _stacked_tables(kernels):
    """(treedef, tables [members, ...]): the kernels' mask tables padded to the widest member
    along the axis splash shrank (block_mask with 0: nothing to compute; the prefetch indices
    by repeating their last entry: nothing new to fetch) and stacked."""
    flat = [jax.tree_util.tree_flatten_with_path(kernel) for kernel in kernels]
    treedef = jax.tree_util.tree_structure(kernels[0])
    for kernel in kernels[1:]:
        if jax.tree_util.tree_structure(kernel) != treedef:
            raise AssertionError("splash kernels for different query starts differ in more "
                                 "than their mask tables")
    stacked = []
    for column in zip(*(leaves for leaves, _ in flat)):
        path = column[0][0]
        arrays = [leaf for _, leaf in column]
        shape = tuple(max(sizes) for sizes in zip(*(a.shape for a in arrays)))
        field = getattr(path[-1], "name", "")
        if field == "q_sequence" and any(a.shape != shape for a in arrays):
            raise AssertionError("splash query-position tables of different lengths")
        dtype = jnp.result_type(*arrays)
        padded = [jnp.pad(a.astype(dtype), [(0, s - n) for s, n in zip(shape, a.shape)],
                          mode="constant" if field == "block_mask" else "edge")
                  for a in arrays]
        stacked.append(jnp.stack(padded))
    return treedef, stacked


def _block(length: int) -> int:
    """The largest multiple of 128 up to 512 that divides `length`."""
    for block in range(_MAX_BLOCK, 0, -_LANES):
        if length % block == 0:
            return block
    raise ValueError(f"length {length} is not a multiple of {_LANES}")
