"""Parameter creation and dtype helpers shared by the blocks."""

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import ModelConfig


def compute_dtype(config: ModelConfig):
    return jnp.dtype(config.dtype)


def param_dtype(config: ModelConfig):
    return jnp.dtype(config.param_dtype)


def normal_param(rngs: nnx.Rngs, shape, config: ModelConfig, axes: tuple[str | None, ...],
                 std: float | None = None) -> nnx.Param:
    """normal(0, initializer_range), HF's init for every linear, conv and embedding weight.

    `axes` names each dimension for the sharding table (qnext_jax/parallel/axes.py)."""
    std = config.initializer_range if std is None else std
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return param(value, config, axes)


def constant_param(value, shape, config: ModelConfig, axes: tuple[str | None, ...],
                   dtype=None) -> nnx.Param:
    return param(jnp.full(shape, value, jnp.float32), config, axes, dtype)


def param(value, config: ModelConfig, axes: tuple[str | None, ...], dtype=None) -> nnx.Param:
    """A parameter in `dtype`, by default the config's param_dtype."""
    if len(axes) != value.ndim:
        raise ValueError(f"axes {axes} do not name the {value.ndim} dimensions of {value.shape}")
    dtype = param_dtype(config) if dtype is None else dtype
    return nnx.Param(value.astype(dtype), axes=tuple(axes))


def abstract_model(config: ModelConfig, seed: int = 0):
    """The model with ShapeDtypeStructs for parameters: structure and shapes, nothing allocated."""
    from qnext_jax.model.transformer import Qwen3NextModel

    return nnx.eval_shape(lambda: Qwen3NextModel(config, rngs=nnx.Rngs(seed)))


def cast(param: nnx.Param, dtype) -> jnp.ndarray:
    """A weight in the compute dtype (parameters are stored in param_dtype, fp32 by default).

    The optimization barrier keeps the cast inside the layer that uses it. Without it XLA
    moves the conversion of the stacked layers' weights out of the layer scan and keeps the
    compute-dtype copies for the whole step: 3.7 GiB more at the 80B's peak on 8 x 8 H100
    (the planner, fsdp 8 x expert 8). XLA:TPU keeps such a copy of the experts (12 x 192 MiB
    on v5p-128) with or without the barrier, at the same peak either way."""
    value = param[...]
    if value.dtype == jnp.dtype(dtype):
        return value
    return jax.lax.optimization_barrier(value).astype(dtype)


def parameter_names(path) -> tuple[str, ...]:
    """The module and parameter names of a pytree path into an nnx.State or a nested dict."""
    # Dict keys name modules and parameters; NNX Variables add a trailing `.value`.
    return tuple(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))
