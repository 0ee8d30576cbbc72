"""Row gathers whose backward sums in fp32.

The gradient of `x[indices]` is a scatter-add of one cotangent row per index into the rows of
`x`, in the cotangent's dtype. In a bf16 step that sum runs in bf16: an embedding row that 70%
of 8,192 tokens read accumulates 5,734 cotangents, and once the running sum is 256 times larger
than an addend the addend rounds away (measured: 1.07 instead of 5.68). The MoE's token gather
(one row per top-k choice) and its dispatch buffers lose less, but the same way. Here the
forward is the same gather in the compute dtype; the backward adds in fp32 and rounds once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def take_rows(table, indices, dtype=None, *, constrain=None):
    """table[indices] in `dtype` (default: the table's); indices past the last row give zero
    rows (and no gradient). The gradient for `table` is accumulated in fp32 and returned in the table's dtype
    (an fp32 parameter gets the fp32 sum itself).

    constrain: an optional function applied to the table after the cast, before the lookup
    (a sharding constraint: FSDP gathers the table's width before reading whole rows), and to
    its gradient."""
    dtype = jnp.dtype(table.dtype if dtype is None else dtype)
    return _take_rows(table, indices, dtype, constrain, table.shape, jnp.dtype(table.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _take_rows(table, indices, dtype, constrain, table_shape, table_dtype):
    return _gather(table, indices, dtype, constrain)


def _gather(table, indices, dtype, constrain):
    table = table.astype(dtype)
    if constrain is not None:
        table = constrain(table)
    return table.at[indices].get(mode="fill", fill_value=0)


def _take_rows_fwd(table, indices, dtype, constrain, table_shape, table_dtype):
    # Only the indices are kept for the backward, not the table.
    return _gather(table, indices, dtype, constrain), indices


def _take_rows_bwd(dtype, constrain, table_shape, table_dtype, indices, cotangent):
    grad = jnp.zeros(table_shape, jnp.float32)
    if constrain is not None:
        grad = constrain(grad)
    grad = grad.at[indices].add(cotangent.astype(jnp.float32), mode="drop")
    return grad.astype(table_dtype), None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def take_sorted_copies(table, order, copies: int):
    """table[order // copies] for `order` a permutation of range(len(table) * copies): every
    row of the table read `copies` times, in the order given (the MoE's tokens sorted by
    expert, one copy per top-k choice).

    Same value as take_rows(table, order // copies); the backward needs no scatter: the
    permutation is undone with a gather and each row's `copies` cotangents are summed in fp32
    as one reduction, which XLA fuses with the gather. take_rows' scatter-add would first
    materialise every cotangent in fp32 ([rows * copies, width], 2.5 GiB a layer for the 80B's
    expert-parallel buffers)."""
    if order.shape != (table.shape[0] * copies,):
        raise ValueError(f"order must be a permutation of {table.shape[0] * copies} indices, "
                         f"got shape {order.shape}")
    return _take_sorted_copies(table, order, copies)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _take_sorted_copies(table, order, copies):
    return table[order // copies]


def _take_sorted_copies_fwd(table, order, copies):
    return table[order // copies], order


def _take_sorted_copies_bwd(copies, order, cotangent):
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    by_copy = cotangent[inverse].reshape(-1, copies, cotangent.shape[-1])  # [rows, copies, E]
    grad = jnp.sum(by_copy, axis=1, dtype=jnp.float32).astype(cotangent.dtype)
    return grad, None


_take_sorted_copies.defvjp(_take_sorted_copies_fwd, _take_sorted_copies_bwd)
