"""The two RMSNorms of Qwen3-Next (spec section 4)."""

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import ModelConfig
from qnext_jax.model.params import constant_param


def _normalize(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """Zero-centred RMSNorm: x_hat * (1 + w), w initialised to 0, all in fp32, rounded once.

    Every norm of the model except the DeltaNet output norm. Weight decay on w pulls the scale
    toward 1, which is what the model card's "weight-decayed layernorm" means.
    """

    def __init__(self, dim: int, config: ModelConfig):
        self.eps = config.rms_norm_eps
        self.weight = constant_param(0.0, (dim,), config, ("norm",))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = 1.0 + self.weight[...].astype(jnp.float32)
        return (_normalize(x, self.eps) * scale).astype(x.dtype)


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
