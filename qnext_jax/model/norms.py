"""The two RMSNorms of Qwen3-Next (spec section 4)."""

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import ModelConfig
from qnext_jax.model.params import constant_param, parameter_names


def _normalize(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """Zero-centred RMSNorm: x_hat * (1 + w), w initialised to 0, all in fp32, rounded once.

    Every norm of the model except the DeltaNet output norm. Weight decay on w pulls the scale
    toward 1, which is what the model card's "weight-decayed layernorm" means.
    `norm_style="plain"` (the studies' control) is x_hat * w with w initialised to 1, where
    decay pulls the scale toward 0.
    """

    def __init__(self, dim: int, config: ModelConfig):
        self.eps = config.rms_norm_eps
        self.norm_style = config.norm_style
        initial = 0.0 if config.norm_style == "zero_centred" else 1.0
        self.weight = constant_param(initial, (dim,), config, ("norm",))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = effective_scale(self.weight[...].astype(jnp.float32), self.norm_style)
        return (_normalize(x, self.eps) * scale).astype(x.dtype)


def is_rms_norm_weight(names: tuple[str, ...]) -> bool:
    """Whether a parameter path (module and parameter names) is an RMSNorm weight, the norms
    `norm_style` switches: every `*norm*.weight` but the DeltaNet's gated output norm."""
    return (len(names) >= 2 and names[-1] == "weight" and "norm" in names[-2]
            and names[-3:] != ("mixer", "norm", "weight"))


def effective_scale(weight: jnp.ndarray, norm_style: str) -> jnp.ndarray:
    """What x_hat is multiplied by: 1 + w zero-centred, w plain."""
    return 1.0 + weight if norm_style == "zero_centred" else weight


class GatedRMSNorm(nnx.Module):
    """The DeltaNet output norm: w * x_hat * silu(z), w initialised to 1 (not zero-centred).

    Like HF's torch path, x_hat is rounded to the activation dtype before the weight multiplies
    it; in fp32 that is exact, in bf16 it matches HF rather than FLA's fused kernel.
    """

    def __init__(self, dim: int, config: ModelConfig):
        self.eps = config.rms_norm_eps
        self.weight = constant_param(1.0, (dim,), config, ("norm",))

    def __call__(self, x: jnp.ndarray, gate: jnp.ndarray) -> jnp.ndarray:
        normed = self.weight[...].astype(jnp.float32) * _normalize(x, self.eps).astype(x.dtype)
        return (normed * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


def largest_norm_scale(params, norm_style: str) -> jnp.ndarray:
    """max |scale| over every RMSNorm weight of `params` (a health metric: Qwen3-Next's
    weight-decayed zero-centred norms exist to keep these from growing abnormally)."""
    largest = [jnp.max(jnp.abs(effective_scale(leaf.astype(jnp.float32), norm_style)))
               for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if is_rms_norm_weight(parameter_names(path))]
    return jnp.max(jnp.stack(largest)) if largest else jnp.zeros((), jnp.float32)
