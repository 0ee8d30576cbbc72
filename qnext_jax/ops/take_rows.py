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
