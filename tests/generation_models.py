"""Small models for the generation tests."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import REPO_ROOT
from qnext_jax.config import ModelConfig
from qnext_jax.model.transformer import Qwen3NextModel


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig.from_yaml(REPO_ROOT / "configs" / "tiny.yaml").replace(**changes)


def draftable_model(config: ModelConfig, seed: int = 0) -> Qwen3NextModel:
    """A random model whose MTP drafts are right about half the time at every depth: its fused
    input is nearly the token embedding (a random init's main model is close to a bigram model
    of the same embedding) and its layer's outputs are damped. Random MTP weights are almost
    never right, which would leave rejection mid-way untested."""
    model = Qwen3NextModel(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    hidden = config.hidden_size
    noise = lambda: 0.5 * rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)
    fc = np.concatenate([np.eye(hidden) + noise(), noise()]).astype(np.float32)
    model.mtp.fc[...] = jnp.asarray(fc)
    for layer in model.mtp.layers:
        layer.mixer.o_proj[...] *= 0.3
        layer.mlp.down_proj[...] *= 0.3
    return model
