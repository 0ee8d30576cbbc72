"""A random model whose MTP drafts are right about half the time: speculative decoding measured
(benchmarks) and tested without a trained model. Random MTP weights are almost never right,
which would measure only rejection and leave rejection mid-way untested."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qnext_jax.config import ModelConfig
from qnext_jax.model.transformer import Qwen3NextModel


def draftable_model(config: ModelConfig, seed: int = 0) -> Qwen3NextModel:
    """The MTP module's fused input is nearly the token embedding (a random init's main model
    is close to a bigram model of the same embedding) and its layer's outputs are damped, so
    its drafts match the main model's next tokens about half the time at every depth."""
    model = Qwen3NextModel(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    hidden = config.hidden_size
    noise = lambda: 0.5 * rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)  # noqa: E731
    fc = np.concatenate([np.eye(hidden) + noise(), noise()])
    model.mtp.fc[...] = jnp.asarray(fc, model.mtp.fc[...].dtype)
    for layer in model.mtp.layers:
        layer.mixer.o_proj[...] *= 0.3
        layer.mlp.down_proj[...] *= 0.3
    return model
