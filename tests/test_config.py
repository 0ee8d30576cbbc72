"""ModelConfig: presets, HF config.json in both formats, validation messages."""

import json

import pytest

from qnext_jax.config import FULL_ATTENTION, ConfigError, ModelConfig

# The Hub's config.json for Qwen3-Next-80B-A3B (v4 format), as spec section 1.1 lists it.
HUB_80B = {
    "architectures": ["Qwen3NextForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645,
    "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 5120, "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "linear_value_head_dim": 128, "max_position_embeddings": 262144, "mlp_only_layers": [],
    "model_type": "qwen3_next", "moe_intermediate_size": 512, "norm_topk_prob": True,
    "num_attention_heads": 16, "num_experts": 512, "num_experts_per_tok": 10,
    "num_hidden_layers": 48, "num_key_value_heads": 2, "output_router_logits": False,
    "partial_rotary_factor": 0.25, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 10000000, "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.57.0.dev0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_80b_preset_matches_the_hub_config(repo_root):
    preset = ModelConfig.from_yaml(repo_root / "configs/qwen3_next_80b_a3b.yaml")
    from_hub = ModelConfig.from_hf(HUB_80B)
    # The compute dtype is the checkpoint's (torch_dtype bfloat16), as in the preset; the preset
    # also recomputes every layer in the backward pass (a run's choice, not the checkpoint's).
    assert from_hub.replace(remat_policy="full") == preset and from_hub.dtype == "bfloat16"
    assert preset.remat_policy == "full"
    assert ModelConfig.from_hf({**HUB_80B, "torch_dtype": "float32"}).dtype == "float32"
    assert ModelConfig.from_hf(HUB_80B, dtype="float32").dtype == "float32"
    assert [i for i, t in enumerate(preset.mixer_types) if t == FULL_ATTENTION] == list(range(3, 48, 4))
    assert preset.rotary_dim == 64 and preset.rope_theta == 1e7
    assert preset.block_size == 4 and preset.num_blocks == 12
    assert preset.num_moe_layers == 48 and preset.mtp_num_hidden_layers == 1


def test_every_preset_loads(repo_root):
    for path in sorted((repo_root / "configs").glob("*.yaml")):
        config = ModelConfig.from_yaml(path)
        assert config.num_hidden_layers % config.block_size == 0, path


def test_v5_round_trip_through_transformers():
    from transformers import Qwen3NextConfig

    ours = ModelConfig.from_hf(HUB_80B).replace(mlp_only_layers=(5,), rope_scaling={"factor": 4.0})
    hf_dict = ours.to_hf("v5")
    assert "rope_parameters" in hf_dict and "rope_theta" not in hf_dict and "layer_types" in hf_dict
    hf = Qwen3NextConfig(**hf_dict)
    assert list(hf.layer_types) == list(ours.mixer_types)
    assert hf.rope_parameters["rope_theta"] == 1e7 and hf.rope_parameters["rope_type"] == "yarn"
    assert ModelConfig.from_hf(json.loads(hf.to_json_string())) == ours


def test_v4_format_is_read_by_transformers():
    from transformers import Qwen3NextConfig

    ours = ModelConfig.from_hf(HUB_80B)
    hf_dict = ours.to_hf("v4")
    assert hf_dict["rope_theta"] == 1e7 and "rope_parameters" not in hf_dict
    assert "layer_types" not in hf_dict  # derivable from full_attention_interval, as on the Hub
    hf = Qwen3NextConfig(**hf_dict)
    assert list(hf.layer_types) == list(ours.mixer_types)
    assert hf.rope_parameters["rope_theta"] == 1e7
    assert hf.rope_parameters["partial_rotary_factor"] == 0.25
    assert ModelConfig.from_hf(hf_dict) == ours


def test_explicit_layer_types_win_over_the_interval():
    types = ["linear_attention", "full_attention"] * 2
    config = ModelConfig.from_hf({**HUB_80B, "num_hidden_layers": 4, "layer_types": types})
    assert list(config.mixer_types) == types and config.block_size == 2


def test_changing_depth_re_derives_the_pattern():
    config = ModelConfig().replace(num_hidden_layers=8)
    assert config.mixer_types.count(FULL_ATTENTION) == 2 and config.num_blocks == 2


def test_block_size_falls_back_to_whole_stack_when_pattern_is_irregular():
    config = ModelConfig(num_hidden_layers=8, mlp_only_layers=(0,))
    assert config.block_size == 8 and config.num_blocks == 1
    assert ModelConfig(num_hidden_layers=8, decoder_sparse_step=2).block_size == 4


def test_hf_file_and_directory_paths(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_80B))
    assert ModelConfig.from_hf(tmp_path) == ModelConfig.from_hf(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="no Hugging Face config"):
        ModelConfig.from_hf(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        ModelConfig.from_hf({**HUB_80B, "model_type": "llama"})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_attention_heads \\(6\\) must be a multiple of num_key_value_heads \\(4\\)"),
        ({"linear_num_value_heads": 24, "linear_num_key_heads": 16}, "linear_num_value_heads \\(24\\) must be a multiple"),
        ({"layer_types": ("full_attention",) * 3}, "layer_types has 3 entries but num_hidden_layers is 48"),
        ({"layer_types": ("linear_attention", "sliding") * 24}, "layer_types\\[1\\] is 'sliding'"),
        ({"mlp_only_layers": (48,)}, "mlp_only_layers holds 48, outside 0..47"),
        ({"num_experts_per_tok": 600}, "num_experts_per_tok \\(600\\) must be in 1..num_experts"),
        ({"partial_rotary_factor": 0.001}, "gives rotary dim 0; it must be even"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"dtype": "float8"}, "dtype is 'float8'"),
        ({"full_attention_interval": 0}, "full_attention_interval must be >= 1"),
    ],
)
def test_validation_names_the_field(changes, message):
    values = {**ModelConfig().to_dict(), **changes}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(values)


def test_unknown_key_suggests_the_nearest(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_expert: 8\n")
    with pytest.raises(ConfigError, match="unknown key 'num_expert' in .*did you mean 'num_experts'"):
        ModelConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")


def test_small_replica_preset_is_tens_of_millions_hybrid_moe_with_mtp(repo_root):
    config = ModelConfig.from_yaml(repo_root / "configs" / "small.yaml")
    counts = config.param_counts()
    assert counts == {"main": 33_139_488, "mtp": 3_745_408, "total": 36_884_896}
    assert config.mixer_types[:4] == ("linear_attention",) * 3 + ("full_attention",)
    assert config.num_moe_layers == 8 and config.shared_expert_intermediate_size > 0
    assert config.mtp_num_hidden_layers == 1
