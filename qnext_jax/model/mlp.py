"""SwiGLU feed-forward: the dense layers (`mlp_only_layers`, `decoder_sparse_step`) and the
MoE's shared expert."""

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import ModelConfig
from qnext_jax.model.params import cast, compute_dtype, normal_param


class SwiGLU(nnx.Module):
    def __init__(self, config: ModelConfig, width: int, *, rngs: nnx.Rngs):
        self.config = config
        hidden = config.hidden_size
        self.gate_proj = normal_param(rngs, (hidden, width), config, ("embed", "mlp"))  # EF
        self.up_proj = normal_param(rngs, (hidden, width), config, ("embed", "mlp"))  # EF
        self.down_proj = normal_param(rngs, (width, hidden), config, ("mlp", "embed"))  # FE

    def __call__(self, x):
        dtype = compute_dtype(self.config)
        x = x.astype(dtype)
        gate = jnp.einsum("...E,EF->...F", x, cast(self.gate_proj, dtype))
        up = jnp.einsum("...E,EF->...F", x, cast(self.up_proj, dtype))
        return jnp.einsum("...F,FE->...E", jax.nn.silu(gate) * up, cast(self.down_proj, dtype))
