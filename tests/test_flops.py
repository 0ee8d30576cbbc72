"""FLOPs accounting (`ModelConfig.training_flops_per_token`) against two independent counts:
the model's own parameter shapes, and XLA's `cost_analysis()` of the compiled forward."""

import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import REPO_ROOT
from qnext_jax.config import ModelConfig
from qnext_jax.model import Qwen3NextModel
from qnext_jax.model import abstract_model


def matmul_weights_per_token(config: ModelConfig) -> float:
    """Multiply-adds per token of every weight matrix, read off the model's own parameters:
    expert stacks count k of E, the LM head once per output (main + each MTP depth),
    embedding lookups and vectors (norms, biases, decay rates) count nothing."""
    _, params = nnx.split(abstract_model(config), nnx.Param)
    total = 0.0
    for path, leaf in nnx.to_flat_state(params):
        names = [str(p) for p in path]
        shape = leaf.get_value().shape
        matrix_dims = len(shape) - (names[0] == "blocks")  # stacked blocks lead with an axis
        head = names[0] == "lm_head" or (names[0] == "embed" and config.tie_word_embeddings)
        if (names[0] == "embed" and not head) or names[-1].startswith("conv") or matrix_dims < 2:
            continue
        size = math.prod(shape)
        if names[-2:-1] == ["mlp"] and names[-1] in ("gate_proj", "up_proj", "down_proj"):
            size *= config.num_experts_per_tok / config.num_experts  # the routed expert stack
        if names[0] == "mtp":
            size *= config.mtp_depth
        if head:  # the LM head (the embedding table when tied) maps every output
            size *= 1 + config.mtp_depth * bool(config.mtp_num_hidden_layers)
        total += size
    return total


@pytest.mark.parametrize("preset", ["small.yaml", "qwen3_next_80b_a3b.yaml"])
def test_training_flops_per_token_counts_the_models_weights(preset):
    config = ModelConfig.from_yaml(REPO_ROOT / "configs" / preset)
    seq_len, chunk = 512, 64
    attention_layers = sum(t == "full_attention" for t in config.mixer_types) + config.mtp_depth
    deltanet_layers = config.num_hidden_layers - sum(t == "full_attention" for t in config.mixer_types)
    attention = 4 * config.num_attention_heads * config.head_dim * (seq_len + 1) / 2
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    delta_rule = config.linear_num_value_heads * (2 * chunk * 2 * (dk + dv) + 6 * dk * dv)
    forward = (2 * matmul_weights_per_token(config) + attention_layers * attention
               + deltanet_layers * delta_rule)
    # The accounting also counts the small vectors (norm weights, conv taps): 0.16% (small).
    assert config.training_flops_per_token(seq_len, chunk) == pytest.approx(3 * forward, rel=2e-3)
    if preset == "qwen3_next_80b_a3b.yaml":  # ~3B active parameters: 6N is the bulk of it
        assert 6 * 3.0e9 < config.training_flops_per_token(4096) < 6 * 5.0e9




def xla_forward_flops_per_token(config: ModelConfig, seq_len: int, batch: int = 2) -> float:
    model = nnx.eval_shape(lambda: Qwen3NextModel(config, rngs=nnx.Rngs(0)))
    graph, params = nnx.split(model)

    def forward(params, ids):
        output = nnx.merge(graph, params)(ids)
        return output.logits, output.mtp_logits  # all heads live: nothing is dead code

    compiled = jax.jit(forward).lower(params, jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / (batch * seq_len)


@pytest.mark.parametrize("tied", [False, True])
def test_training_flops_per_token_match_xla_cost_analysis(tied):
    """XLA counts every dot it compiles (2 FLOPs per multiply-add) but a loop body only once,
    so the model here has no loop: one attention layer (one scanned block, trip count 1; the
    delta rule's chunk scan would be undercounted), every expert active through the dense MoE
    (XLA then computes exactly the top-k = E experts we count), MTP at depth 2 and a
    vocabulary large enough that the three LM-head products weigh. What XLA counts beyond
    the accounting: attention over all T keys, not the causal mean, and elementwise work."""
    tiny = ModelConfig.from_yaml(REPO_ROOT / "configs" / "tiny.yaml")
    config = tiny.replace(layer_types=("full_attention",), num_hidden_layers=1, moe_impl="dense",
                          num_experts_per_tok=tiny.num_experts, vocab_size=2048, mtp_depth=2,
                          tie_word_embeddings=tied)
    seq_len = 16
    ours = config.training_flops_per_token(seq_len) / 3
    assert xla_forward_flops_per_token(config, seq_len) == pytest.approx(ours, rel=0.03)
