"""Grouped matmul for the MoE experts: rows sorted by group, each group times its own matrix.

`jax.lax.ragged_dot` is the grouped GEMM of GPUs and TPUs. XLA:CPU lowers it densely — every
row times every group's matrix, then a select (measured: temporaries 2x rows x groups x out) —
so on CPU we use a tiled form instead: each group's rows are padded to whole tiles of `tile`
rows, every tile belongs to one group, and one batched matmul multiplies each tile by its
group's matrix. Work is the real rows plus at most `tile - 1` padding rows per group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qnext_jax.ops.platform import target_platform


def grouped_matmul(rows, weights, group_sizes, *, impl: str = "auto", tile: int = 64):
    """rows [R, K] sorted by group; weights [G, K, F]; group_sizes [G] (sum <= R; rows past the
    sum are not computed and come back as zeros). Returns [R, F]."""
    if impl == "auto":
        impl = "tiled" if target_platform() == "cpu" else "ragged"
    if impl == "ragged":
        return jax.lax.ragged_dot(rows, weights, group_sizes)
    return tiled_grouped_matmul(rows, weights, group_sizes, tile)


def tiled_grouped_matmul(rows, weights, group_sizes, tile: int = 64):
    num_rows, num_groups = rows.shape[0], weights.shape[0]
    group_sizes = group_sizes.astype(jnp.int32)
    padded_sizes = -(-group_sizes // tile) * tile
    ends, padded_ends = jnp.cumsum(group_sizes), jnp.cumsum(padded_sizes)
    starts, padded_starts = ends - group_sizes, padded_ends - padded_sizes
    num_tiles = -(-(num_rows + num_groups * (tile - 1)) // tile)  # static worst case

    index = jnp.arange(num_rows)
    row_group = jnp.searchsorted(ends, index, side="right")  # == num_groups past the last group
    in_group = row_group < num_groups
    group = jnp.minimum(row_group, num_groups - 1)
    # Each row's slot in the tiled layout; rows past the last group go nowhere (dropped).
    slot = jnp.where(in_group, padded_starts[group] + index - starts[group], num_tiles * tile)
    tiles = jnp.zeros((num_tiles * tile, rows.shape[1]), rows.dtype).at[slot].set(rows, mode="drop")
    tile_group = jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile, side="right")
    tile_weights = weights[jnp.minimum(tile_group, num_groups - 1)]  # [tiles, K, F]
    out = jnp.einsum("TMK,TKF->TMF", tiles.reshape(num_tiles, tile, -1), tile_weights)
    out = out.reshape(num_tiles * tile, -1)
    return out.at[slot].get(mode="fill", fill_value=0)
