"""Tiny random `transformers` Qwen3-Next models for parity tests (CPU, fp32)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the reference; absent on Python 3.12 (.ci/run)
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

# Two shapes: GQA 2x in both mixers with 8 experts; and 3x value-head grouping, MHA-like
# attention, 6 experts top-3, a dense layer and a different rotary fraction.
SHAPES = {
    "gqa": dict(
        vocab_size=97, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=8, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=24, shared_expert_intermediate_size=40, intermediate_size=48,
        partial_rotary_factor=0.25, rope_theta=10000.0,
    ),
    "wide": dict(
        vocab_size=131, hidden_size=48, num_hidden_layers=8, num_attention_heads=3,
        num_key_value_heads=3, head_dim=32, linear_num_key_heads=1, linear_num_value_heads=3,
        linear_key_head_dim=8, linear_value_head_dim=16, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, intermediate_size=40,
        mlp_only_layers=[5], partial_rotary_factor=0.5, rope_theta=1.0e6, norm_topk_prob=False,
    ),
}


def hf_config(shape: str, **changes) -> Qwen3NextConfig:
    values = dict(SHAPES[shape], max_position_embeddings=1024, rms_norm_eps=1e-6,
                  full_attention_interval=4, output_router_logits=True)
    values.update(changes)
    rope = {"rope_type": "default", "rope_theta": values.pop("rope_theta"),
            "partial_rotary_factor": values.pop("partial_rotary_factor")}
    values["rope_parameters"] = rope
    config = Qwen3NextConfig(**values)
    return config


def random_hf_model(shape: str, seed: int = 0, stress: bool = True, **changes) -> Qwen3NextForCausalLM:
    """A random fp32 model; `stress` scales the linear weights up and perturbs every norm weight
    so that the numerics are exercised far from the near-identity init."""
    torch.manual_seed(seed)
    model = Qwen3NextForCausalLM(hf_config(shape, **changes)).float().eval()
    # The eager paths are the ones the spec describes (per-expert loop, softmax attention);
    # the default grouped-mm experts also refuse float64, which the tests use to measure error.
    model.set_experts_implementation("eager")
    model.set_attn_implementation("eager")
    if stress:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("A_log") or name.endswith("dt_bias"):
                    param.add_(0.3 * torch.randn(param.shape, generator=generator))
                elif param.ndim == 1 or "norm" in name:
                    param.add_(0.2 * torch.randn(param.shape, generator=generator))
                elif "embed" in name:
                    continue
                else:
                    param.mul_(4.0)
    return model


def hf_logits(model, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.as_tensor(input_ids, dtype=torch.long))
    return out.logits.float().numpy()
