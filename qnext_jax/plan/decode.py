"""The decode step (or a speculative round) of a model, compiled for a target by its compiler.

What a device holds comes from the compiler (`memory_analysis`). What a step must read is
counted here, per device, for the layout decoding uses (generate/sharding.py): the dense
weights of the main model, the routed experts the step's tokens choose (their expected count:
X (1 - (1 - k/X)^n) of X experts for n tokens choosing k each), the LM head, the attention
caches up to their full length, and the DeltaNet states (read and written, fp32). A decode step
is memory-bound, so these bytes over the memory bandwidth are its floor; a speculative round
reads the weights once for up to D + 1 tokens a row (plus D drafting passes of the MTP layer),
so its floor per token falls as more drafts are accepted. The compiled program's own bytes
accessed (XLA's cost analysis) is reported beside the floor; it does not see into custom-call
kernels (the grouped expert matmuls on GPU and TPU), so it can undercount the experts.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import ModelConfig
from qnext_jax.generate.cache import AttentionCache
from qnext_jax.generate.generator import _steps, initial_state, jit_on_mesh
from qnext_jax.generate.sampling import SamplingSettings
from qnext_jax.generate.sharding import generation_rules, padded_rows, state_shardings
from qnext_jax.model import abstract_model
from qnext_jax.parallel.axes import param_axes
from qnext_jax.parallel.mesh import MeshConfig, make_mesh
from qnext_jax.plan.compiler import Compiled, compile_jitted, target_devices
from qnext_jax.plan.targets import Target


@dataclasses.dataclass(frozen=True)
class DecodeFloor:
    """Bytes one device reads in one step (plain) or round (speculative)."""

    dense: float  # main model weights other than the routed experts and the embedding
    experts: float  # the routed experts the step's tokens choose
    mtp: float  # the MTP layer and head, once per draft (speculative only)
    caches: float  # attention keys and values at full length, DeltaNet states in and out
    tokens_per_row: int  # at most: 1 (plain) or D + 1 (a round whose drafts all pass)
    experts_held: float  # the main model's routed experts a device holds (all of them read)

    @property
    def total(self) -> float:
        return self.dense + self.experts + self.mtp + self.caches


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    target: Target
    mesh: dict[str, int]
    batch: int  # rows asked for
    rows: int  # rows decoded (padded to the row shards)
    cache_length: int
    depth: int  # drafts a round (0: plain decoding)
    compiled: Compiled
    floor: DecodeFloor
    argument_bytes: int  # the shards of the parameters it uses and of the state on a device

    @property
    def floor_seconds(self) -> float:
        return self.floor.total / self.target.bandwidth

    @property
    def compiled_seconds(self) -> float:
        return self.compiled.bytes_accessed / self.target.bandwidth


def plan_decode(config: ModelConfig, target: Target, mesh_sizes: dict[str, int], *,
                batch: int, cache_length: int, depth: int = 0) -> DecodePlan:
    """Compiles one decode step (depth 0) or speculative round for `target`."""
    config = config.replace(param_dtype=config.dtype)  # generation reads the compute dtype
    devices = target_devices(target)
    mesh = make_mesh(MeshConfig(**{"fsdp": 1, **mesh_sizes}), devices)
    rules = generation_rules(config, mesh)
    rows = padded_rows(batch, mesh)
    graph, params = nnx.split(abstract_model(config))
    params = jax.tree.map(
        lambda v: v.replace(jax.ShapeDtypeStruct(v.shape, v.value.dtype,
                                                 sharding=rules.sharding(param_axes(v)))),
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    settings = SamplingSettings()  # greedy: the floor is the same for sampling
    state = jax.eval_shape(
        functools.partial(initial_state, config, depth, rows, cache_length, settings),
        jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.bool_),
        jax.eval_shape(lambda: jax.random.key(0)))
    state = jax.tree.map(lambda s, placed: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placed),
                         state, state_shardings(state, rules))
    step = jit_on_mesh(functools.partial(_steps, graph, depth=depth, most=1, settings=settings,
                                         stop_tokens=(), max_new=cache_length),
                       mesh, rules, donate_argnums=(1,))
    limit = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = compile_jitted(step, (params, state, limit), target, devices[0])
    floor = decode_floor(config, params, state, rows, depth)
    # What the program takes: jit drops unused arguments, the MTP module's in plain decoding.
    used = [v.value for path, v in nnx.to_flat_state(params) if depth or path[0] != "mtp"]
    held = sum(_shard_bytes(leaf) for leaf in jax.tree.leaves((used, state)))
    return DecodePlan(target, dict(mesh_sizes), batch, rows, cache_length, depth, compiled, floor,
                      held)


def decode_floor(config: ModelConfig, params, state, rows: int, depth: int) -> DecodeFloor:
    """What one device must read in a step (module docstring): `params` and `state` abstract
    and placed on the mesh (their shard shapes are what a device holds), `rows` rows decoded."""
    chosen = _expected_experts(config, rows * (depth + 1))
    drafted = _expected_experts(config, rows)
    dense = experts = held = mtp = 0.0
    for path, variable in nnx.to_flat_state(params):
        size = _shard_bytes(variable.value)
        routed = {"experts", "mlp"} <= set(param_axes(variable))
        if path[0] == "embed" and not config.tie_word_embeddings:
            continue  # the step reads its tokens' rows only
        if path[0] == "mtp":
            mtp += depth * size * (drafted if routed else 1.0)  # once per draft
        elif routed:
            experts += size * chosen
            held += size
        else:
            dense += size
    caches = 0.0
    for cache in (state.main, *state.mtp):
        for layer in cache.layers:
            if isinstance(layer, AttentionCache):  # read whole: the floor at a full cache
                caches += _shard_bytes(layer.key) + _shard_bytes(layer.value)
            else:  # the recurrent state read and written, the conv window read
                caches += 2 * _shard_bytes(layer.state) + sum(map(_shard_bytes, layer[:3]))
    return DecodeFloor(dense, experts, mtp, caches, depth + 1, held)


def _expected_experts(config: ModelConfig, tokens: int) -> float:
    """The expected fraction of the routed experts that `tokens` tokens choose (uniform
    routing: each expert is missed by a token with probability 1 - k/X)."""
    if not config.num_experts:
        return 0.0
    return 1 - (1 - config.num_experts_per_tok / config.num_experts) ** tokens


def _shard_bytes(leaf) -> int:
    return math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
