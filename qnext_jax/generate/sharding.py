"""Decoding on a mesh: parameters and caches placed by the training's logical-axis table.

Tensor parallelism splits heads and MLP widths (and the caches' heads with them), expert
parallelism the routed experts, and `data`, `fsdp` and `expert` the rows, as in training; the
decode steps are the same jitted programs, partitioned by the compiler from these placements,
with the MoE and the prefill attention running their `shard_map` paths. Rows are padded to a
multiple of the row shards (a batch of 1 on `expert` 8 decodes 8 rows): every device then holds
whole rows and the MoE's token axes divide its tokens. On a memory-bound decode step the extra
rows cost little next to reading the weights. `fsdp` would gather every weight at every step,
and `sequence` splits no single-token step: a generation mesh leaves both at 1.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

from qnext_jax.generate.cache import AttentionCache, DeltaNetCache, StackCache
from qnext_jax.generate.state import DecodeState
from qnext_jax.parallel.axes import ShardingRules, logical_spec, param_axes, spec_axes
from qnext_jax.parallel.mesh import MESH_AXES, MeshConfig, MeshError, axis_size, make_mesh


_NOT_SPLIT = {"fsdp": "it would gather every weight at every step",
              "sequence": "a decode step has one token a row"}


def generation_mesh(sizes: dict[str, int], devices=None):
    """The mesh for decoding from axis sizes ({"tensor": 2, "expert": 4}); unnamed axes are 1.
    Raises MeshError for sizes the devices cannot make or an axis decoding does not split."""
    for name, why in _NOT_SPLIT.items():
        if sizes.get(name, 1) != 1:
            raise MeshError(f"mesh.{name} = {sizes[name]}: decoding keeps {name} at 1 ({why}); "
                            "split over data, tensor and expert")
    return make_mesh(MeshConfig(**{"fsdp": 1, **sizes}), devices)


def mesh_sizes(flags: list[str]) -> dict[str, int]:
    """["tensor=4", "expert=2"] (the command lines' --mesh flags) -> {"tensor": 4, ...}."""
    sizes = {}
    for flag in flags:
        name, _, size = flag.partition("=")
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise MeshError(f"--mesh {flag!r}: expected AXIS=SIZE with AXIS one of "
                            f"{', '.join(MESH_AXES)} and SIZE a positive integer")
        sizes[name] = int(size)
    return sizes


def generation_rules(config, mesh) -> ShardingRules:
    """The training's table without ZeRO: training shards every weight's model width over
    `expert` too, which a decode step would gather at every token. Here dense weights are
    split by `tensor` alone, routed experts by `expert` and `tensor`."""
    rules = ShardingRules(config, mesh)
    rules.table["embed"] = None
    return rules


def row_shards(mesh) -> int:
    """How many ways the rows are split: rows are padded to a multiple of this."""
    return math.prod(axis_size(mesh, name) for name in spec_axes(logical_spec(("batch",))[0]))


def padded_rows(rows: int, mesh) -> int:
    shards = 1 if mesh is None else row_shards(mesh)
    return -(-rows // shards) * shards


def state_shardings(state: DecodeState, rules: ShardingRules) -> DecodeState:
    """NamedShardings shaped like `state`: caches by rows and heads, per-row values by rows,
    counters replicated."""
    def named(*axes):
        return rules.sharding(axes)

    def stack(cache: StackCache, lead: int) -> StackCache:
        return StackCache(tuple(_layer(layer, lead, named) for layer in cache.layers),
                          named("batch"))

    rows = named("batch")
    replicated = NamedSharding(rules.mesh, PartitionSpec())
    return DecodeState(
        main=stack(state.main, 1),
        mtp=tuple(stack(cache, 0) for cache in state.mtp),
        tokens=named("batch", None), n_tokens=rows, prompt_length=rows, done=rows,
        key=replicated, drafts=named("batch", None), draft_probs=named("batch", None, None),
        rings=tuple(named("batch", None, None) for _ in state.rings),
        accepted=replicated, offered=replicated, rounds=replicated,
    )


def _layer(cache, lead: int, named):
    blocks = (None,) * lead
    if isinstance(cache, AttentionCache):
        axes = named(*blocks, "batch", "kv_heads", None, "head_dim")
        return AttentionCache(axes, axes)
    if not isinstance(cache, DeltaNetCache):
        raise TypeError(f"no placement for a cache of type {type(cache).__name__}")
    key_window = named(*blocks, "batch", "conv", "key_heads", "head_dim")
    return DeltaNetCache(key_window, key_window,
                         named(*blocks, "batch", "conv", "value_heads", "head_dim"),
                         named(*blocks, "batch", "value_heads", "head_dim", "head_dim"))


def place_params(params, rules: ShardingRules):
    """Parameters on their shards (a no-op for arrays already placed so, as the loaders do)."""
    return jax.device_put(params, rules.param_shardings(params))


def shardings_by_path(config, mesh):
    """parameter path -> its NamedSharding on `mesh` by `generation_rules` (what the Hugging
    Face loader takes to read each parameter straight into its shards)."""
    from flax import nnx

    from qnext_jax.model import abstract_model

    rules = generation_rules(config, mesh)
    _, state = nnx.split(abstract_model(config))
    shardings = {path: rules.sharding(param_axes(variable))
                 for path, variable in nnx.to_flat_state(state)}
    return shardings.get
