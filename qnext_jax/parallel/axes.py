"""The logical-axis table: the one place that maps named tensor axes to mesh axes.

Model parameters carry logical axis names (`nnx.Param(..., axes=(...))`, see model/params.py);
activations name theirs where they are constrained. This table turns those names into
PartitionSpecs for parameters, optimizer state, batches, activations and the MoE shard_map.
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from qnext_jax.config import ModelConfig
from qnext_jax.ops.linear_cross_entropy import HeadSharding
from qnext_jax.parallel.mesh import BATCH_AXES, MESH_AXES, MeshError, axis_size

# The mesh axes that shard the model width of every parameter (ZeRO-3): each axis that would
# otherwise hold a replica. `fsdp` by name; `sequence` and `expert` split the tokens of the
# dense layers, so without this every sequence or expert shard would hold (and update) the
# whole dense model and its AdamW state: for the 80B as expert 8 x sequence 8, 12.3B parameters
# a device instead of 1.3B. Only `data` (plain data parallelism) and `tensor` (which shards
# heads and widths itself) keep replicas. A weight whose expert axis is already on `expert`
# (the routed experts) shards its width over the rest (logical_spec uses a mesh axis once).
EMBED_AXES = ("fsdp", "sequence", "expert")

LOGICAL_TO_MESH: dict[str, str | tuple[str, ...] | None] = {
    # Parameters. The width is sharded as above; tensor parallelism shards heads and MLP
    # widths; expert parallelism shards the expert axis.
    "vocab": "tensor",
    "embed": EMBED_AXES,
    "heads": "tensor",  # attention query heads (and their output gate)
    "kv_heads": "tensor",  # replicated instead when tensor > kv heads, as GQA does everywhere
    "key_heads": "tensor",  # DeltaNet key heads
    "value_heads": "tensor",  # DeltaNet value heads (their key head is on the same rank)
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "layers": None,  # the stacked (scanned) block axis
    "conv": None,
    "norm": None,
    "fused": None,  # the MTP's [embedding | hidden] input width
    # Activations: data, fsdp and expert split the rows outside the MoE; sequence their tokens.
    "batch": BATCH_AXES,
    "sequence": "sequence",
    "act_embed": None,
    "act_vocab": None,
}


def check_model_fits_mesh(config: ModelConfig, mesh) -> None:
    """Raises MeshError for a dimension the mesh cannot split evenly, naming both."""
    tensor, expert = (axis_size(mesh, n) for n in ("tensor", "expert"))
    width_shards = {n: axis_size(mesh, n) for n in EMBED_AXES}  # every parameter's width
    checks = [
        ("num_attention_heads", config.num_attention_heads, "tensor", tensor),
        ("linear_num_key_heads", config.linear_num_key_heads, "tensor", tensor),
        ("linear_num_value_heads", config.linear_num_value_heads, "tensor", tensor),
        ("vocab_size", config.vocab_size, "tensor", tensor),
        ("hidden_size", config.hidden_size, _product_label(width_shards),
         math.prod(width_shards.values())),
    ]
    if config.num_experts:
        checks += [
            ("num_experts", config.num_experts, "expert", expert),
            ("moe_intermediate_size", config.moe_intermediate_size, "tensor", tensor),
            ("shared_expert_intermediate_size", config.shared_expert_intermediate_size,
             "tensor", tensor),
        ]
    elif expert > 1:
        raise MeshError(f"mesh.expert is {expert} but the model has no experts")
    if config.num_experts == 0 or config.num_moe_layers < config.num_hidden_layers:
        checks.append(("intermediate_size", config.intermediate_size, "tensor", tensor))
    for field, size, mesh_axis, shards in checks:
        if size % shards:
            raise MeshError(
                f"model {field} = {size} is not divisible by mesh.{mesh_axis} = {shards}"
            )


def _product_label(sizes: dict[str, int]) -> str:
    """'fsdp' for one axis that splits; 'fsdp x mesh.sequence = 4 x 2' for several."""
    split = {name: size for name, size in sizes.items() if size > 1} or {"fsdp": 1}
    if len(split) == 1:
        return next(iter(split))
    return " x mesh.".join(split) + " = " + " x ".join(str(size) for size in split.values())


class ShardingRules:
    """Logical axes -> PartitionSpecs and NamedShardings for one model on one mesh."""

    def __init__(self, config: ModelConfig, mesh):
        check_model_fits_mesh(config, mesh)
        self.mesh = mesh
        self.table = dict(LOGICAL_TO_MESH)
        if config.num_key_value_heads % axis_size(mesh, "tensor"):
            self.table["kv_heads"] = None

    def spec(self, logical_axes: tuple[str | None, ...]) -> PartitionSpec:
        return logical_spec(logical_axes, self.table)

    def sharding(self, logical_axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes))

    def param_spec(self, variable: nnx.Variable) -> PartitionSpec:
        return self.spec(param_axes(variable))

    def param_shardings(self, params):
        """NamedShardings shaped like `params` (an nnx.State of Params, abstract or real)."""
        return jax.tree.map(
            lambda v: NamedSharding(self.mesh, self.param_spec(v)), params, is_leaf=_is_variable
        )

    def like_params(self, tree, params):
        """Shardings for a tree whose array leaves mirror parameters (optimizer moments): each
        leaf whose path ends with a parameter's path gets that parameter's sharding; anything
        else (step counters, scalars) is replicated."""
        by_path = {}
        for path, variable in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_variable):
            by_path[_dict_keys(path)] = (variable.shape, self.param_spec(variable))

        def sharding(path, leaf):
            keys = _dict_keys(path)
            for start in range(len(keys)):
                match = by_path.get(keys[start:])
                if match is not None and match[0] == tuple(leaf.shape):
                    return NamedSharding(self.mesh, match[1])
            return NamedSharding(self.mesh, PartitionSpec())

        return jax.tree_util.tree_map_with_path(sharding, tree)

    def batch_sharding(self) -> NamedSharding:
        """[batch, sequence] arrays (token ids, masks, segment ids, positions)."""
        return self.sharding(("batch", "sequence"))


def logical_spec(logical_axes, table=LOGICAL_TO_MESH) -> PartitionSpec:
    """The PartitionSpec of logical axes. A mesh axis shards one dimension at most: a later
    dimension mapped to an axis an earlier one took keeps the rest of its axes (the routed
    experts' [experts, embed, mlp]: experts on `expert`, the width on fsdp x sequence)."""
    parts, used = [], set()
    for name in logical_axes:
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} is not in the sharding table")
        mesh_axes = () if name is None else spec_axes(table[name])
        free = tuple(axis for axis in mesh_axes if axis not in used)
        used.update(free)
        parts.append(None if not free else free[0] if isinstance(table[name], str) else free)
    return PartitionSpec(*parts)


def spec_axes(part) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (a name, a tuple of names or None) as a tuple."""
    if part is None:
        return ()
    return (part,) if isinstance(part, str) else tuple(part)


def param_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """The logical axes of a parameter; stacked block parameters gain a leading `layers`."""
    axes = tuple(variable.get_metadata().get("axes", ()))
    if len(variable.shape) == len(axes) + 1:
        return ("layers",) + axes
    if len(variable.shape) != len(axes):
        raise ValueError(f"parameter of shape {variable.shape} is annotated with axes {axes}")
    return axes


def under_mesh() -> bool:
    """True while tracing under one of our meshes (the train step sets it)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and set(MESH_AXES) <= set(mesh.axis_names)


def head_sharding() -> HeadSharding | None:
    """How the fused LM head + cross-entropy (ops/linear_cross_entropy) splits its tokens and
    vocabulary under the ambient mesh; None with no mesh or one device (nothing to split)."""
    if not under_mesh() or jax.sharding.get_abstract_mesh().size == 1:
        return None
    hidden = logical_spec(("batch", "sequence"))
    return HeadSharding(hidden[0], hidden[1], logical_spec(("vocab",))[0],
                        logical_spec(("embed",))[0])


def shard_map_logical(fn, in_axes, out_axes):
    """jax.shard_map over the ambient mesh, specs given as logical axes (None for an argument
    that is None). `fn` computes on each device's shards and makes every collective it needs
    explicit (the context-parallel exchanges over `sequence`). The varying-axes check is off:
    numerics code that knows no mesh (a scan seeded with zeros) would otherwise need casts; so
    every output axis is named in `out_axes`, and an input replicated over an axis (a weight)
    gets its gradient summed over that axis, as shard_map does without the check."""
    spec = lambda axes: None if axes is None else logical_spec(axes)  # noqa: E731
    return jax.shard_map(
        fn, mesh=jax.sharding.get_abstract_mesh(),
        in_specs=tuple(spec(a) for a in in_axes), out_specs=spec(out_axes), check_vma=False,
    )


def constrain(x, logical_axes):
    """with_sharding_constraint by logical names under the ambient mesh; a no-op without one."""
    return constrain_spec(x, logical_spec(logical_axes))


def constrain_spec(x, spec: PartitionSpec):
    """with_sharding_constraint to a PartitionSpec under the ambient mesh; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
