"""The routed SwiGLU experts on CPU: capacity buckets plus overflow tiles, one fused custom VJP.

XLA:CPU has no grouped GEMM: `ragged_dot` expands densely (every row times every expert), and
the tiled formulation (ops/grouped_matmul.py) gathers one copy of an expert's matrices per
64-row tile, keeps those copies for the backward and scatter-adds their gradients back —
measured 2.5x the time of its FLOPs. Here each expert gets a bucket of `capacity` rows
(`capacity_factor` times the mean load, so a balanced router fills them), and the three
projections of all buckets are three batched matmuls [G, C, E] x [G, E, F], which XLA:CPU runs
at the speed of one dense matmul of the same size. Dropless: the choices past their expert's
capacity are computed in tiles of `tile` rows by a loop whose trip count is the number of
overflow tiles (none when the router is balanced), each tile reading its expert's matrices in
place.

The VJP is written out rather than differentiated: the backward recomputes nothing but the
activation's derivative, accumulates the weight gradients per bucket with batched matmuls, and
moves rows with gathers only (XLA:CPU scatters row by row); the layer's residuals are the bucket
inputs and the pre-activations, no per-tile weight copies.

Rows [N, E] with choices experts [N, k] (ids >= G are skipped: expert parallelism sends ids of
experts that live elsewhere) and routing weights [N, k]; returns, per row, the routing-weighted
sum of its experts' SwiGLU outputs, [N, E].
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_CAPACITY_FACTOR = 1.25
DEFAULT_TILE = 64


class Plan(NamedTuple):
    """Where every choice goes (integers, no gradient). R = N * k choices, C = capacity."""

    order: jnp.ndarray  # [R] choices sorted by expert (stable), skipped ones last
    source: jnp.ndarray  # [R] per choice, its row in [buckets (G*C) | overflow (R) | zero (1)]
    bucket_choice: jnp.ndarray  # [G, C] per bucket slot, its choice (R: an empty slot)
    tile_expert: jnp.ndarray  # [T] per overflow tile, its expert
    tile_start: jnp.ndarray  # [T] first sorted position of the tile's choices
    tile_stop: jnp.ndarray  # [T] one past its last (the expert's end)
    tiles: jnp.ndarray  # [] overflow tiles in use (the loop's trip count)


def capacity_for(rows: int, experts: int, capacity_factor: float) -> int:
    """Bucket rows per expert: the mean load times the factor, rounded up to 8 (>= 8)."""
    return max(8, -(-math.ceil(capacity_factor * rows / experts) // 8) * 8)


def make_plan(experts: jnp.ndarray, num_experts: int, capacity: int, tile: int) -> Plan:
    num_choices = experts.size
    flat = experts.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    sorted_position = jnp.zeros((num_choices,), jnp.int32).at[order].set(
        jnp.arange(num_choices, dtype=jnp.int32))
    valid = flat < num_experts
    expert = jnp.minimum(flat, num_experts - 1)
    rank = sorted_position - starts[expert]  # the choice's place among its expert's choices
    overflow_row = num_experts * capacity + sorted_position
    zero_row = num_experts * capacity + num_choices
    source = jnp.where(valid, jnp.where(rank < capacity, expert * capacity + rank, overflow_row),
                       zero_row)
    slot = jnp.arange(capacity)
    bucket_choice = jnp.where(slot < sizes[:, None],
                              order[jnp.minimum(starts[:, None] + slot, num_choices - 1)],
                              num_choices)
    overflow_tiles = -(-jnp.maximum(sizes - capacity, 0) // tile)
    tile_ends = jnp.cumsum(overflow_tiles)
    max_tiles = -(-num_choices // tile) + num_experts  # static worst case
    index = jnp.arange(max_tiles)
    tile_expert = jnp.minimum(jnp.searchsorted(tile_ends, index, side="right"), num_experts - 1)
    first = index - (tile_ends[tile_expert] - overflow_tiles[tile_expert])
    tile_start = starts[tile_expert] + capacity + first * tile
    return Plan(order, source, bucket_choice, tile_expert, tile_start, ends[tile_expert],
                tile_ends[-1])


def bucketed_swiglu(rows, weights, experts, gate_w, up_w, down_w, *,
                    capacity_factor: float = DEFAULT_CAPACITY_FACTOR, tile: int = DEFAULT_TILE):
    """rows [N, E]; weights, experts [N, k]; gate_w, up_w [G, E, F]; down_w [G, F, E] -> [N, E]."""
    num_experts = gate_w.shape[0]
    capacity = capacity_for(experts.size, num_experts, capacity_factor)
    tile = min(tile, experts.size)
    plan = jax.tree.map(jax.lax.stop_gradient, make_plan(experts, num_experts, capacity, tile))
    return _experts(rows, weights.astype(rows.dtype), gate_w, up_w, down_w, plan, tile)


def _silu_and_slope(x):
    sigmoid = jax.nn.sigmoid(x)
    return x * sigmoid, sigmoid * (1 + x * (1 - sigmoid))


def _with_zero_row(x):
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])


class _Tile(NamedTuple):
    expert: jnp.ndarray  # []
    start: jnp.ndarray  # [] window start (clamped to fit inside the R sorted choices)
    mask: jnp.ndarray  # [tile, 1] which of the window's choices belong to this tile
    choices: jnp.ndarray  # [tile] the window's choice ids


def _tile(plan: Plan, i, tile: int) -> _Tile:
    num_choices = plan.order.shape[0]
    start = jnp.clip(plan.tile_start[i], 0, num_choices - tile)
    position = start + jnp.arange(tile)
    mask = (position >= plan.tile_start[i]) & (position < plan.tile_stop[i])
    return _Tile(plan.tile_expert[i], start, mask[:, None],
                 jax.lax.dynamic_slice_in_dim(plan.order, start, tile))


def _write(buffer, tile_rows, t: _Tile):
    """buffer[window] = tile_rows where the tile's mask holds (its neighbours' rows kept)."""
    old = jax.lax.dynamic_slice_in_dim(buffer, t.start, t.mask.shape[0])
    return jax.lax.dynamic_update_slice_in_dim(buffer, jnp.where(t.mask, tile_rows, old),
                                               t.start, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _experts(rows, weights, gate_w, up_w, down_w, plan, tile):
    return _forward(rows, weights, gate_w, up_w, down_w, plan, tile)[0]


@jax.named_scope("routed_experts")  # custom VJPs lose their source lines: name them for profiles
def _forward(rows, weights, gate_w, up_w, down_w, plan: Plan, tile):
    num_rows, top_k = weights.shape
    num_experts, hidden, _ = gate_w.shape
    num_choices = num_rows * top_k
    bucket_rows = _with_zero_row(rows)[plan.bucket_choice // top_k]  # [G, C, E]
    gate = jnp.einsum("GCE,GEF->GCF", bucket_rows, gate_w)
    up = jnp.einsum("GCE,GEF->GCF", bucket_rows, up_w)
    bucket_out = jnp.einsum("GCF,GFE->GCE", _silu_and_slope(gate)[0] * up, down_w)

    def overflow_tile(i, out):
        t = _tile(plan, i, tile)
        x = rows[t.choices // top_k]
        y = (_silu_and_slope(x @ gate_w[t.expert])[0] * (x @ up_w[t.expert])) @ down_w[t.expert]
        return _write(out, y, t)

    overflow_out = jax.lax.fori_loop(0, plan.tiles, overflow_tile,
                                     jnp.zeros((num_choices, hidden), rows.dtype))
    every_out = _with_zero_row(jnp.concatenate(
        [bucket_out.reshape(num_experts * bucket_out.shape[1], hidden), overflow_out]))
    choice_out = every_out[plan.source].reshape(num_rows, top_k, hidden)
    out = jnp.einsum("NKE,NK->NE", choice_out, weights)
    return out, (rows, weights, gate_w, up_w, down_w, plan, bucket_rows, gate, up, choice_out)


@jax.named_scope("routed_experts")
def _backward(tile, residuals, out_grad):
    rows, weights, gate_w, up_w, down_w, plan, bucket_rows, gate, up, choice_out = residuals
    num_rows, top_k = weights.shape
    num_experts, hidden, _ = gate_w.shape
    capacity = bucket_rows.shape[1]
    weights_grad = jnp.einsum("NKE,NE->NK", choice_out, out_grad)
    # d(out) / d(expert output of choice (n, j)) = weight[n, j] * out_grad[n]
    choice_grad = (weights[:, :, None] * out_grad[:, None, :]).reshape(-1, hidden)

    def swiglu_grads(x, gate, up, y_grad, w_gate, w_up, w_down, spec):
        """One SwiGLU's gradients; spec: einsum prefix ("GC" batched buckets, "C" a tile)."""
        b = spec[:-1]
        act, slope = _silu_and_slope(gate)
        h_grad = jnp.einsum(f"{spec}E,{b}FE->{spec}F", y_grad, w_down)
        gate_grad, up_grad = h_grad * up * slope, h_grad * act
        return (
            jnp.einsum(f"{spec}F,{b}EF->{spec}E", gate_grad, w_gate)
            + jnp.einsum(f"{spec}F,{b}EF->{spec}E", up_grad, w_up),
            jnp.einsum(f"{spec}E,{spec}F->{b}EF", x, gate_grad),
            jnp.einsum(f"{spec}E,{spec}F->{b}EF", x, up_grad),
            jnp.einsum(f"{spec}F,{spec}E->{b}FE", act * up, y_grad),
        )

    bucket_grad = _with_zero_row(choice_grad)[plan.bucket_choice]  # [G, C, E]
    rows_grad_buckets, gate_w_grad, up_w_grad, down_w_grad = swiglu_grads(
        bucket_rows, gate, up, bucket_grad, gate_w, up_w, down_w, "GC")

    def overflow_tile(i, carry):
        rows_grad, gate_w_grad, up_w_grad, down_w_grad = carry
        t = _tile(plan, i, tile)
        g = t.expert
        x = rows[t.choices // top_k]
        y_grad = jnp.where(t.mask, choice_grad[t.choices], 0)
        x_grad, dg, du, dd = swiglu_grads(x, x @ gate_w[g], x @ up_w[g], y_grad,
                                          gate_w[g], up_w[g], down_w[g], "C")
        return (_write(rows_grad, x_grad, t), gate_w_grad.at[g].add(dg),
                up_w_grad.at[g].add(du), down_w_grad.at[g].add(dd))

    overflow_grad, gate_w_grad, up_w_grad, down_w_grad = jax.lax.fori_loop(
        0, plan.tiles, overflow_tile,
        (jnp.zeros((plan.order.shape[0], hidden), rows.dtype), gate_w_grad, up_w_grad,
         down_w_grad))
    every_grad = _with_zero_row(jnp.concatenate(
        [rows_grad_buckets.reshape(num_experts * capacity, hidden), overflow_grad]))
    # A row's k choices add up in fp32 (in bf16 they would round at every addition).
    rows_grad = every_grad[plan.source].reshape(num_rows, top_k, hidden).sum(
        axis=1, dtype=jnp.float32).astype(rows.dtype)
    no_grad = jax.tree.map(lambda _: None, plan)
    return rows_grad, weights_grad, gate_w_grad, up_w_grad, down_w_grad, no_grad


_experts.defvjp(_forward, _backward)
