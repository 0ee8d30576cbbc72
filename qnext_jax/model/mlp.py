"""SwiGLU feed-forward: the dense layers (`mlp_only_layers`, `decoder_sparse_step`) and the
MoE's shared expert."""

import jax
import jax.numpy as jnp
from flax import nnx

from qnext_jax.config import ModelConfig
from qnext_jax.model.params import cast, compute_dtype, normal_param
from qnext_jax.model.projections import project_together


class SwiGLU(nnx.Module):
    def __init__(self, config: ModelConfig, width: int, *, rngs: nnx.Rngs):
        self.config = config
        hidden = config.hidden_size
        self.gate_proj = normal_param(rngs, (hidden, width), config, ("embed", "mlp"))  # EF
        self.up_proj = normal_param(rngs, (hidden, width), config, ("embed", "mlp"))  # EF
        self.down_proj = normal_param(rngs, (width, hidden), config, ("mlp", "embed"))  # FE

    def __call__(self, x):
        dtype = compute_dtype(self.config)
        gate, up = project_together(
            x.astype(dtype), [cast(self.gate_proj, dtype), cast(self.up_proj, dtype)])
        return jnp.einsum("...F,FE->...E", jax.nn.silu(gate) * up, cast(self.down_proj, dtype))
