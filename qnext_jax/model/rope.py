"""Partial rotary position embedding (rotate-half form on the first rotary_dim dims), with
optional YaRN context extension. Frequencies are computed in fp32 exactly as HF does."""

import math

import jax.numpy as jnp
import numpy as np

from qnext_jax.config import ModelConfig, RopeScaling


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [rotary_dim / 2] fp32, attention scaling applied to cos and sin)."""
    dim = config.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    base_freqs = np.float32(config.rope_theta) ** exponents  # theta^(2j/d)
    if config.rope_scaling is None:
        return (1.0 / base_freqs).astype(np.float32), 1.0
    return _yarn(config, config.rope_scaling, dim, base_freqs)


def _yarn(config: ModelConfig, scaling: RopeScaling, dim: int, base_freqs: np.ndarray):
    factor = scaling.factor

    def mscale(scale, coefficient=1.0):
        return 1.0 if scale <= 1 else 0.1 * coefficient * math.log(scale) + 1.0

    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):
        original = scaling.original_max_position_embeddings
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(config.rope_theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    extrapolated = 1.0 / base_freqs
    interpolated = 1.0 / (factor * base_freqs)
    inv_freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def rotary_tables(positions: jnp.ndarray, config: ModelConfig, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin: [B, T, rotary_dim], computed in fp32 then cast to the activation dtype (as HF)."""
    inv_freq, scaling = rope_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return (jnp.cos(angles) * scaling).astype(dtype), (jnp.sin(angles) * scaling).astype(dtype)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [B, T, heads, head_dim]; rotates the first rotary_dim dims, passes the rest through."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x_rot * cos + rotated_half * sin, x_pass], axis=-1).astype(x.dtype)
