"""Expert-parallel MoE: experts split over the mesh's `expert` axis, tokens sent to them and back.

Inside the MoE the `expert` axis changes role: outside it shards the batch like `data` and
`fsdp`; here it shards the experts. Each device holds X / S experts (S = expert-axis size) and
its own n tokens. Per MoE layer, within each group of S devices along `expert`:

  1. dispatch: every token goes once to each device that holds at least one of its top-k experts
     (not once per expert: the choices bound for one device ride along with the token, as k ids
     and k weights), through one all-to-all of fixed-size buffers;
  2. compute: each device runs its local experts on what it received as one grouped matmul
     (`grouped_swiglu`), weighting each output by its routing weight, so a token's choices on one
     device come back already summed into one row;
  3. combine: a second all-to-all returns the rows; each token sums its rows from all devices.
     With tensor parallelism the expert MLP width is split over `tensor` and a psum adds it up.

Communication per token per MoE layer (forward; the backward repeats it), in rows of `hidden`:
  useful      at most min(k, S) rows out and as many back (one per destination device);
  on the wire the buffers are static: dropless (`moe_capacity_factor: null`) sizes each
              destination's buffer for all n tokens, S rows per token each way — the volume of
              an all-gather, but no token is ever dropped; a capacity factor c sizes them to
              c * n * k / S rows, about c * k rows per token each way, and drops overflow.

Memory per MoE layer and device (n tokens, k choices, S shards, factor c):
  receive buffer   S * C token rows: S * n dropless, about c * n * k with a factor;
  grouped matmuls  one row per local choice, not one per received id (a received token carries
                   k ids, about k / S of them local): S * n * k rows dropless — a static buffer
                   must hold the worst case, every token of the group choosing this device;
                   MaxText's ragged all-to-all receive buffer has the same size — and c * n * k
                   with a factor, the local choices past it (in arrival order) dropped.
The expert weights arrive as stored (experts over `expert`, their width over the parameter axes)
and are all-gathered inside, so that their gradients leave reduce-scattered.

`ragged_all_to_all` would put only the filled rows on the wire, but its receive buffers have
the same static worst case, and XLA:CPU does not run it: this dense-buffer form runs on every
platform and is tested on CPU meshes against one device.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from qnext_jax.ops.grouped_swiglu import fused_gate_up, grouped_swiglu
from qnext_jax.ops.take_rows import take_rows
from qnext_jax.parallel.axes import logical_spec, spec_axes
from qnext_jax.parallel.mesh import TOKEN_AXES, axis_size

EXPERT_IN = ("experts", "embed", "mlp")  # gate and up projections [X, E, F]
EXPERT_OUT = ("experts", "mlp", "embed")  # down projection [X, F, E]


def expert_parallel_ffn(tokens, weights, experts, gate_w, up_w, down_w, *,
                        capacity_factor: float | None = None, impl: str = "auto"):
    """The routed-expert output [N, E] for tokens [N, E] sharded over the token axes (rows and
    sequence shards); the expert weights [X, E, F] / [X, F, E] sharded by the table (FSDP is
    gathered on entry)."""
    mesh = jax.sharding.get_abstract_mesh()
    num_tokens, top_k = experts.shape
    if mesh.size == 1 and _capacity(num_tokens, top_k, 1, capacity_factor) == num_tokens:
        # One device holds every expert and drops nothing: no shard_map, whose backward would
        # sum the weight gradients over one-device axes (a copy per layer on XLA:CPU).
        return grouped_swiglu(tokens, weights, experts, (gate_w, up_w), down_w,
                              impl)
    tokens_spec = PartitionSpec(TOKEN_AXES, None)
    weight_in, weight_out = logical_spec(EXPERT_IN), logical_spec(EXPERT_OUT)
    in_specs = (tokens_spec, tokens_spec, tokens_spec, weight_in, weight_in, weight_out)
    width_axes_in, width_axes_out = spec_axes(weight_in[1]), spec_axes(weight_out[2])

    def local(tokens, weights, experts, gate_w, up_w, down_w):
        # The weights come in as stored (their width split over fsdp and the other axes that
        # shard parameters) and are gathered here, explicitly: the gather's transpose is a
        # reduce-scatter, so each device's expert-weight gradients stay sharded. Gathered by
        # GSPMD on entry instead, the backward all-reduces whole gradients over the token
        # axes (1 GiB a projection a layer for the 80B without expert parallelism).
        # Gate and up fused before the gather, so the gathered weight is the fused one.
        # Without a gather (decoding's layout) they stay apart: grouped_swiglu fuses them
        # only for enough rows.
        if _gathered(width_axes_in):
            gate_up_w = _gather_width(fused_gate_up(gate_w, up_w), width_axes_in, 1)
        else:
            gate_up_w = (gate_w, up_w)
        down_w = _gather_width(down_w, width_axes_out, 2)
        return _dispatch_compute_combine(
            tokens, weights, experts, gate_up_w, down_w, shards=axis_size(mesh, "expert"),
            capacity_factor=capacity_factor, impl=impl)

    # check_vma=False: Pallas kernels inside (the TPU megablox GMM) declare no varying axes.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=tokens_spec,
                         check_vma=False)(tokens, weights, experts, gate_w, up_w, down_w)


def _gathered(mesh_axes) -> bool:
    return any(jax.lax.axis_size(a) > 1 for a in mesh_axes)


def _gather_width(weight, mesh_axes, axis):
    if not _gathered(mesh_axes):
        return weight
    return jax.lax.all_gather(weight, mesh_axes, axis=axis, tiled=True)



def _dispatch_compute_combine(tokens, weights, experts, gate_up_w, down_w, *, shards,
                              capacity_factor, impl):
    """Per device: tokens [n, E], routing [n, k], local experts [X/S, ...] (gate and up fused,
    or a (gate, up) pair)."""
    num_tokens, top_k = experts.shape
    local_experts = down_w.shape[0]
    capacity = _capacity(num_tokens, top_k, shards, capacity_factor)
    if shards == 1 and capacity == num_tokens:  # every expert here and nothing dropped
        return _sum_over_tensor(
            grouped_swiglu(tokens, weights, experts, gate_up_w, down_w, impl))
    home = experts // local_experts  # [n, k] the device along `expert` holding each choice
    bound_for = home[:, :, None] == jnp.arange(shards)  # [n, k, S]
    visits = bound_for.any(axis=1)  # [n, S] does the token go to device s at all
    slot = jnp.cumsum(visits, axis=0) - 1  # [n, S] its row in that device's buffer
    kept = visits & (slot < capacity)
    slot = jnp.where(kept, slot, capacity)  # out of range: scatters drop it, gathers fill 0
    device = jnp.broadcast_to(jnp.arange(shards), (num_tokens, shards))

    def to_buffers(per_token_and_device, fill):  # [n, S, ...] -> [S, capacity, ...]
        shape = (shards, capacity) + per_token_and_device.shape[2:]
        buffer = jnp.full(shape, fill, per_token_and_device.dtype)
        return buffer.at[device, slot].set(per_token_and_device, mode="drop")

    # Choices bound elsewhere get id `local_experts` (skipped by grouped_swiglu) and weight 0.
    choice_ids = jnp.where(bound_for, (experts % local_experts)[:, :, None], local_experts)
    choice_weights = jnp.where(bound_for, weights[:, :, None], 0).astype(weights.dtype)
    # Each buffer slot names the token it carries (num_tokens: an empty slot, a zero row), so
    # the tokens are gathered once, and a token's gradient rows from its S destinations are
    # summed in fp32 (take_rows).
    source_token = to_buffers(jnp.broadcast_to(jnp.arange(num_tokens)[:, None], slot.shape),
                              num_tokens)  # [S, C]
    send_tokens = take_rows(tokens, source_token)  # [S, C, E]
    send_ids = to_buffers(choice_ids.transpose(0, 2, 1), local_experts)  # [S, C, k]
    send_weights = to_buffers(choice_weights.transpose(0, 2, 1), 0)

    exchange = partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0,
                       tiled=True)  # [S (destination), C, ...] -> [S (source), C, ...]
    received = exchange(send_tokens).reshape(shards * capacity, -1)
    received_ids = exchange(send_ids).reshape(shards * capacity, top_k)
    choices = _choice_capacity(num_tokens, top_k, shards, capacity, capacity_factor)
    if choices < received_ids.size:
        # Of the S * C * k ids received, about n * k name a local expert: the grouped matmuls
        # run on c * n * k rows, and local choices past them (in arrival order: by source
        # device, then buffer slot) are dropped like any over capacity.
        local = (received_ids < local_experts).reshape(-1)
        arrived = jnp.cumsum(local).reshape(received_ids.shape)
        received_ids = jnp.where(arrived <= choices, received_ids, local_experts)
    out_rows = grouped_swiglu(
        received, exchange(send_weights).reshape(shards * capacity, top_k), received_ids,
        gate_up_w, down_w, impl, max_choices=choices,
    )
    returned = exchange(out_rows.reshape(shards, capacity, -1))  # [S (expert device), C, E]
    gathered = returned.at[device, slot].get(mode="fill", fill_value=0)  # [n, S, E]
    out = jnp.sum(jnp.where(kept[..., None], gathered, 0), axis=1, dtype=jnp.float32)
    return _sum_over_tensor(out.astype(tokens.dtype))


def _capacity(num_tokens, top_k, shards, capacity_factor):
    """Rows of each device's receive buffer: every token (dropless) without a factor."""
    if capacity_factor is None:
        return num_tokens
    return min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens * top_k / shards)))


def _choice_capacity(num_tokens, top_k, shards, capacity, capacity_factor):
    """Rows of the grouped matmuls on each device: every received choice when dropless (a
    static buffer must hold the worst case, every token of the S devices choosing this one:
    S * n * k), else c * n * k (each device's expected share, n * k, times the factor)."""
    received = shards * capacity * top_k
    if capacity_factor is None:
        return received
    return min(received, max(1, math.ceil(capacity_factor * num_tokens * top_k)))


def _sum_over_tensor(out):
    """Tensor ranks each hold a slice of the expert width: add their outputs up (a psum over
    one device still costs XLA:CPU a copy of the output, so none is emitted then)."""
    if jax.lax.axis_size("tensor") == 1:
        return out
    return jax.lax.psum(out, "tensor")
