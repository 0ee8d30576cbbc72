"""Row gathers whose backward sums in fp32.

The gradient of `x[indices]` is a scatter-add of one cotangent row per index into the rows of
`x`, in the cotangent's dtype. In a bf16 step that sum runs in bf16: an embedding row that 70%
of 8,192 tokens read accumulates 5,734 cotangents, and once the running sum is 256 times larger
than an addend the addend rounds away (measured: 1.07 instead of 5.68). The MoE's token gather
(one row per top-k choice) and its dispatch buffers lose less, but the same way. Here the
forward is the same gather in the compute dtype; the backward adds in fp32 and rounds once.

`take_sorted_copies` and `combine_sorted` are the MoE's two permutations (tokens sorted by
expert, one copy per choice, and the experts' outputs back in token order), written so that
their memory follows the rows actually computed rather than every (token, choice) pair.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def take_rows(table, indices, dtype=None, *, constrain=None, grad_layout=None):
    """table[indices] in `dtype` (default: the table's); indices past the last row give zero
    rows (and no gradient). The gradient for `table` is accumulated in fp32 and returned in the table's dtype
    (an fp32 parameter gets the fp32 sum itself).

    constrain: an optional function applied to the table after the cast, before the lookup
    (a sharding constraint: FSDP gathers the table's width before reading whole rows), and to
    its gradient.
    grad_layout: (for the gradient's fp32 sum, for the cotangent rows) sharding constraints
    used by the backward instead of `constrain`: the sum kept sharded as the table is stored,
    the rows moved to match (each device adds every token's slice of its own width shard,
    instead of every device adding its own tokens into a whole fp32 table: 1.2 GB for the
    80B's embedding)."""
    dtype = jnp.dtype(table.dtype if dtype is None else dtype)
    return _take_rows(table, indices, dtype, constrain, grad_layout, table.shape,
                      jnp.dtype(table.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _take_rows(table, indices, dtype, constrain, grad_layout, table_shape, table_dtype):
    return _gather(table, indices, dtype, constrain)


def _gather(table, indices, dtype, constrain):
    table = table.astype(dtype)
    if constrain is not None:
        table = constrain(table)
    return table.at[indices].get(mode="fill", fill_value=0)


def _take_rows_fwd(table, indices, dtype, constrain, grad_layout, table_shape, table_dtype):
    # Only the indices are kept for the backward, not the table.
    return _gather(table, indices, dtype, constrain), indices


def _take_rows_bwd(dtype, constrain, grad_layout, table_shape, table_dtype, indices, cotangent):
    grad = jnp.zeros(table_shape, jnp.float32)
    cotangent = cotangent.astype(jnp.float32)
    if grad_layout is not None:
        grad, cotangent = grad_layout[0](grad), grad_layout[1](cotangent)
    elif constrain is not None:
        grad = constrain(grad)
    grad = grad.at[indices].add(cotangent, mode="drop")
    if grad_layout is not None:
        grad = grad_layout[0](grad)
    return grad.astype(table_dtype), None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def take_sorted_copies(table, order, copies: int, computed=None):
    """table[order // copies] for `order` the first L entries of a permutation of
    range(len(table) * copies): rows of the table read up to `copies` times each, in the order
    given (the MoE's tokens sorted by expert, one copy per top-k choice; L < rows * copies when
    the choices past L are dropped).

    Same value as take_rows(table, order // copies), and the gradient is summed in fp32 too,
    but when most copies are kept (dropless) the backward needs no scatter: the permutation is
    undone with a gather and each row's `copies` cotangents are summed in fp32 as one
    reduction. take_rows' scatter-add would first materialise every cotangent in fp32
    ([rows * copies, width], 2.5 GiB a layer for the 80B's expert-parallel buffers); with few
    copies kept (a capacity factor) that is the smaller form, [kept, width] fp32.

    computed: (may be traced) only the first `computed` result rows are used; the cotangent of
    the rows past them is never read (it may be anything, NaN included: the rows a grouped
    matmul leaves unwritten), so the caller needs no masked copy of it."""
    if order.ndim != 1 or order.shape[0] > table.shape[0] * copies:
        raise ValueError(f"order must be at most {table.shape[0] * copies} indices of a "
                         f"permutation, got shape {order.shape}")
    return _take_sorted_copies(table, order, _count(computed, order), copies, table.shape[0])


def inverse_positions(order, length: int, computed=None):
    """For each of range(length), its position in `order` (part of a permutation of
    range(length)); len(order) for the indices `order` leaves out, and for those at positions
    `computed` and past."""
    positions = jnp.arange(order.shape[0], dtype=order.dtype)
    if computed is not None:
        positions = jnp.where(positions < computed, positions, order.shape[0])
    return jnp.full((length,), order.shape[0], order.dtype).at[order].set(positions)


def _count(computed, order):
    return jnp.asarray(order.shape[0] if computed is None else computed, jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _take_sorted_copies(table, order, computed, copies, table_rows):
    return table[order // copies]


def _take_sorted_copies_fwd(table, order, computed, copies, table_rows):
    return table[order // copies], (order, computed)


def _take_sorted_copies_bwd(copies, table_rows, saved, cotangent):
    order, computed = saved
    if not _gathers_back(order.shape[0], table_rows * copies):  # few copies kept: add them
        used = (jnp.arange(order.shape[0]) < computed)[:, None]
        grad = jnp.zeros((table_rows, cotangent.shape[-1]), jnp.float32)
        grad = grad.at[order // copies].add(jnp.where(used, cotangent.astype(jnp.float32), 0))
        return grad.astype(cotangent.dtype), None, None
    inverse = inverse_positions(order, table_rows * copies, computed)  # len(order): not used
    by_copy = cotangent.at[inverse].get(mode="fill", fill_value=0)
    by_copy = by_copy.reshape(table_rows, copies, cotangent.shape[-1])
    grad = jnp.sum(by_copy, axis=1, dtype=jnp.float32).astype(cotangent.dtype)
    return grad, None, None


_take_sorted_copies.defvjp(_take_sorted_copies_fwd, _take_sorted_copies_bwd)


def combine_sorted(rows, order, weights, computed=None):
    """out[n] = sum_j weights[n, j] * rows[position of n * k + j in `order`] (zero for a
    choice `order` leaves out): the MoE's expert outputs, sorted by expert, back in token
    order and weighted by their routing weights, summed in fp32. rows [L, E]; order [L] (the
    first L entries of a permutation of range(N * k)); weights [N, k].

    computed: (may be traced) only the first `computed` rows are read; those past it count as
    left out, whatever they hold (NaN included: a grouped matmul's unwritten rows), and get a
    zero gradient, so the caller needs no masked copy of them.

    Memory: the forward gathers [N, k, E] (fused into its sum where XLA can) when L is most
    of N * k, else adds [L, E] fp32 into [N, E]; the backward is one gather either way (the
    gather's own transpose, a scatter-add, would build [L, E] from zeros): the cotangent's
    rows in sorted order, [L, E], from which both gradients are fused products."""
    return _combine_sorted(rows, order, weights, _count(computed, order))


@jax.custom_vjp
def _combine_sorted(rows, order, weights, computed):
    return _combine_forward(rows, order, weights, computed)


def _combine_forward(rows, order, weights, computed):
    tokens, copies = weights.shape
    if _gathers_back(order.shape[0], tokens * copies):
        inverse = inverse_positions(order, tokens * copies, computed).reshape(tokens, copies)
        picked = rows.at[inverse].get(mode="fill", fill_value=0)  # [N, k, E]
        out = jnp.sum(picked.astype(jnp.float32) * weights.astype(jnp.float32)[..., None],
                      axis=1)
        return out.astype(rows.dtype)
    used = (jnp.arange(order.shape[0]) < computed)[:, None]
    weighted = rows.astype(jnp.float32) * weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    out = jnp.zeros((tokens, rows.shape[1]), jnp.float32).at[order // copies].add(
        jnp.where(used, weighted, 0))
    return out.astype(rows.dtype)


def _combine_sorted_fwd(rows, order, weights, computed):
    return _combine_forward(rows, order, weights, computed), (rows, order, weights, computed)


def _combine_sorted_bwd(saved, cotangent):
    rows, order, weights, computed = saved
    # Row p of the sorted rows is token order[p] // k's choice order[p] % k. One gather of the
    # cotangent rows serves both gradients, kept in the cotangent's dtype and widened inside
    # each fused product. The planner's peak for the 80B on v5p-128 (fsdp 8 x expert 8): 33.3
    # GiB so; 36.3 with this gather in fp32; 40.0 with the weights' gradient from a second
    # gather, of the rows into token order.
    used = (jnp.arange(order.shape[0]) < computed)[:, None]
    token_grad = cotangent[order // weights.shape[1]].astype(jnp.float32)  # [L, E]
    choice_weight = weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    grad_rows = jnp.where(used, token_grad * choice_weight, 0).astype(rows.dtype)
    per_choice = jnp.sum(jnp.where(used, token_grad * rows.astype(jnp.float32), 0), axis=1)
    grad_weights = jnp.zeros(weights.size, jnp.float32).at[order].set(per_choice)
    return grad_rows, None, grad_weights.reshape(weights.shape).astype(weights.dtype), None


_combine_sorted.defvjp(_combine_sorted_fwd, _combine_sorted_bwd)


def _gathers_back(kept: int, total: int) -> bool:
    """Undo a sort by gathering all `total` positions ([total, E] in the compute dtype) or by
    adding the `kept` rows in fp32 ([kept, E] fp32): whichever is smaller."""
    return 2 * kept >= total
