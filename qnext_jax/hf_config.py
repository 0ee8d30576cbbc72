"""Hugging Face `config.json` <-> `ModelConfig`, both the v4 and the v5 file formats.

v4 (the Hub's 80B file): top-level `rope_theta`, `partial_rotary_factor`, `rope_scaling`, and no
`layer_types` (derived from `full_attention_interval`). v5 (what transformers>=5 writes):
`rope_parameters: {rope_type, rope_theta, partial_rotary_factor, ...}` and explicit `layer_types`.
HF defaults differ from the 80B values, so nothing here falls back on transformers' defaults:
a field the file lacks takes the value HF itself would give it (spec section 1.3).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from qnext_jax.config import ConfigError, ModelConfig, RopeScaling

# HF's own defaults (Qwen3NextConfig), used only for fields a config.json leaves out.
_HF_DEFAULTS = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=48,
    num_attention_heads=16, num_key_value_heads=2, hidden_act="silu",
    max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6,
    tie_word_embeddings=False, rope_theta=10000.0, partial_rotary_factor=0.25,
    attention_bias=False, head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
    decoder_sparse_step=1, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    num_experts_per_tok=10, num_experts=512, norm_topk_prob=True, router_aux_loss_coef=0.001,
    full_attention_interval=4, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)

_COPIED = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "tie_word_embeddings", "attention_bias", "head_dim", "linear_conv_kernel_dim",
    "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
    "linear_num_value_heads", "decoder_sparse_step", "moe_intermediate_size",
    "shared_expert_intermediate_size", "num_experts_per_tok", "num_experts", "norm_topk_prob",
    "router_aux_loss_coef", "full_attention_interval", "bos_token_id", "eos_token_id",
    "pad_token_id",
]

def _read(path_or_dict) -> dict[str, Any]:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = Path(path_or_dict)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no Hugging Face config at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err


def config_from_hf(path_or_dict, **overrides) -> ModelConfig:
    """Builds a ModelConfig from a HF `config.json` (path, directory, or parsed dict)."""
    hf = _read(path_or_dict)
    model_type = hf.get("model_type", "qwen3_next")
    if model_type != "qwen3_next":
        raise ConfigError(f"config.json has model_type {model_type!r}; expected 'qwen3_next'")
    values: dict[str, Any] = {k: hf.get(k, _HF_DEFAULTS[k]) for k in _COPIED}

    # Rope: v5 nests it under rope_parameters; v4 keeps it at top level.
    rope = hf.get("rope_parameters")
    if rope:
        values["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        values["partial_rotary_factor"] = rope.get(
            "partial_rotary_factor", hf.get("partial_rotary_factor", 0.25)
        )
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    else:
        values["rope_theta"] = hf.get("rope_theta", _HF_DEFAULTS["rope_theta"])
        values["partial_rotary_factor"] = hf.get("partial_rotary_factor", 0.25)
        scaling = dict(hf.get("rope_scaling") or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope type {rope_type!r} in config.json is not supported (default, yarn)")
    if rope_type == "yarn":
        fields = {f.name for f in dataclasses.fields(RopeScaling)}
        kwargs = {k: v for k, v in scaling.items() if k in fields and v is not None}
        kwargs.setdefault("original_max_position_embeddings", values["max_position_embeddings"])
        values["rope_scaling"] = RopeScaling(**kwargs)

    if hf.get("layer_types") is not None:
        values["layer_types"] = tuple(hf["layer_types"])
        derived = ModelConfig.from_dict({**values, "layer_types": None}).mixer_types
        if values["layer_types"] == derived:
            values["layer_types"] = None  # v5 writes them out; keep the interval as the source
    values["mlp_only_layers"] = tuple(hf.get("mlp_only_layers") or ())
    # Qwen3-Next's config.json names no MTP field although the checkpoint holds one MTP layer
    # (vLLM reads num_nextn_predict_layers with default 1; Qwen3.5 writes mtp_num_hidden_layers).
    values["mtp_num_hidden_layers"] = hf.get(
        "mtp_num_hidden_layers", hf.get("num_nextn_predict_layers", 1)
    )
    # Compute in the dtype the checkpoint was stored in (a bf16 release computes in bf16);
    # parameters stay fp32 unless asked (`param_dtype`).
    stored = hf.get("dtype") or hf.get("torch_dtype")
    if stored in ("float32", "bfloat16", "float16"):
        values["dtype"] = stored
    values.update(overrides)
    return ModelConfig.from_dict(values, where="config.json")


def config_to_hf(config: ModelConfig, fmt: Literal["v4", "v5"] = "v5") -> dict[str, Any]:
    """A `config.json` dict that transformers' Qwen3NextConfig reads back to the same model."""
    if fmt not in ("v4", "v5"):
        raise ConfigError(f"HF config format must be 'v4' or 'v5', got {fmt!r}")
    out: dict[str, Any] = {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        # The dtype transformers loads and computes in: ours computes in `dtype`.
        "torch_dtype": config.dtype,
    }
    for key in _COPIED:
        out[key] = getattr(config, key)
    out["mlp_only_layers"] = list(config.mlp_only_layers)
    out["mtp_num_hidden_layers"] = config.mtp_num_hidden_layers
    scaling = None
    if config.rope_scaling is not None:
        scaling = {k: v for k, v in dataclasses.asdict(config.rope_scaling).items() if v is not None}
    if fmt == "v5":
        out["layer_types"] = list(config.mixer_types)
        rope = {
            "rope_type": "default",
            "rope_theta": config.rope_theta,
            "partial_rotary_factor": config.partial_rotary_factor,
        }
        if scaling:
            rope.update(scaling)
        out["rope_parameters"] = rope
    else:
        out["rope_theta"] = config.rope_theta
        out["partial_rotary_factor"] = config.partial_rotary_factor
        out["rope_scaling"] = scaling
        # v4 files carry no layer_types; write them only when the interval cannot express them.
        if config.layer_types is not None:
            out["layer_types"] = list(config.layer_types)
    return out
