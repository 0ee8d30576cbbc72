"""Model configuration: one frozen dataclass, YAML presets, validation, and the layer pattern.

Field names follow the Hugging Face `Qwen3NextConfig` so that `config.json` maps one to one
(see `qnext_jax/hf_config.py` for reading and writing that file). Only the fields that change
the maths live here; training settings live with the trainer.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml

LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)


class ConfigError(ValueError):
    """A configuration a user wrote is not valid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN context extension (the only rope scaling Qwen3-Next's model card uses)."""

    rope_type: Literal["yarn"] = "yarn"
    factor: float = 4.0
    original_max_position_embeddings: int = 262144
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Vocabulary and trunk.
    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    # Layer pattern: explicit `layer_types`, or every `full_attention_interval`-th layer is
    # attention (left None then, so that changing num_hidden_layers re-derives it).
    layer_types: tuple[str, ...] | None = None
    full_attention_interval: int = 4
    # Gated (full) attention.
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    partial_rotary_factor: float = 0.25
    rope_theta: float = 1.0e7
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 262144
    # Gated DeltaNet (linear attention).
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    # Feed-forward: sparse MoE with a shared expert, dense SwiGLU where the pattern asks for it.
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    intermediate_size: int = 5120
    router_aux_loss_coef: float = 0.001
    # Multi-token prediction: decoder layers inside the one MTP module, and how many tokens ahead
    # it is applied (depth > 1 reuses the module recursively, as speculative decoding does).
    mtp_num_hidden_layers: int = 1
    mtp_depth: int = 1
    # Misc architecture.
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # Design switches, each defaulting to the released architecture (the small-replica studies
    # of qnext_jax/experiments turn them off one at a time). Hugging Face knows none of them as
    # a config field: a model with the gate off cannot be exported; plain norms export as the
    # zero-centred weights w - 1, which compute the same x_hat * w.
    attention_output_gate: bool = True  # False: plain attention output, no gate projection
    norm_style: Literal["zero_centred", "plain"] = "zero_centred"  # x_hat*(1+w), w=0 | x_hat*w, w=1
    router_init: Literal["normalised", "plain"] = "normalised"  # equal-norm expert rows | normal(0, std)
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151645
    pad_token_id: int | None = None
    # Numerics and implementation choices (not part of the architecture).
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # The router's (and shared-expert gate's) matmul: "float32" routes on fp32 logits from the
    # fp32 weights, as Megatron and DeepSeek-V3 train (bf16 logits pick another expert set for
    # ~7% of tokens at 512 experts, top-10); "compute" multiplies in the compute dtype as
    # transformers does, for bf16 inference that must match it bit for bit.
    router_dtype: Literal["float32", "compute"] = "float32"
    delta_rule_impl: Literal["auto", "reference", "chunked", "pallas"] = "auto"
    # ops/causal_attention.py: "auto" is splash on TPU, mosaic_gpu on Hopper, else blockwise; "blockwise" is an
    # online softmax over key blocks (O(T * block) memory); "splash" JAX's TPU kernel;
    # "mosaic_gpu" tokamax's Hopper flash kernel (what "auto" picks on an H100 in bf16); "xla"
    # jax.nn.dot_product_attention with a [T, T] document mask (the reference).
    attention_impl: Literal["auto", "blockwise", "splash", "mosaic_gpu", "xla"] = "auto"
    # With the row split over `sequence` (parallel/context_parallel.py): "zigzag" gives every
    # shard the same causal attention work (shard i attends chunks i and 2P-1-i of the row's
    # 2P); "contiguous" attends each shard's own tokens (shard i does (2i+1)/P^2 of the work).
    context_parallel_attention: Literal["zigzag", "contiguous"] = "zigzag"
    moe_impl: Literal["ragged", "dense"] = "ragged"
    # The routed experts' grouped matmul (ops/grouped_matmul.py): "auto" is tokamax on GPU,
    # megablox on TPU, capacity buckets on CPU; "ragged" is XLA's ragged_dot anywhere.
    grouped_matmul: Literal["auto", "tokamax", "megablox", "ragged", "tiled"] = "auto"
    # Expert parallelism: None is dropless (each device's send buffer holds all its tokens for
    # every destination); a factor c sizes the buffers to c * tokens * k / expert-shards rows
    # and drops the routed choices that overflow (the token keeps its other experts).
    moe_capacity_factor: float | None = None
    remat_policy: Literal["none", "full", "dots"] = "none"
    # The decoder blocks run as a loop ("scan": one compiled block, whatever the depth) or
    # unrolled ("unroll"); "auto" unrolls on CPU, where the loop copies every block's saved
    # activations into and out of stacked buffers (17% of the small replica's step), and
    # loops elsewhere.
    layer_scan: Literal["auto", "scan", "unroll"] = "auto"

    def __post_init__(self):
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
            "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
            "max_position_embeddings", "mtp_depth", "decoder_sparse_step",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ConfigError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})"
            )
        if self.full_attention_interval < 1:
            raise ConfigError(
                f"full_attention_interval must be >= 1, got {self.full_attention_interval}"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.mixer_types):
            if kind not in LAYER_TYPES:
                raise ConfigError(f"layer_types[{i}] is {kind!r}; expected one of {LAYER_TYPES}")
        for i in self.mlp_only_layers:
            if not 0 <= i < self.num_hidden_layers:
                raise ConfigError(
                    f"mlp_only_layers holds {i}, outside 0..{self.num_hidden_layers - 1}"
                )
        if self.num_experts < 0 or self.mtp_num_hidden_layers < 0:
            raise ConfigError("num_experts and mtp_num_hidden_layers must be >= 0")
        if self.num_experts > 0:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                    f"1..num_experts ({self.num_experts})"
                )
            if self.moe_intermediate_size < 1:
                raise ConfigError("moe_intermediate_size must be >= 1 when num_experts > 0")
        if any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            if self.intermediate_size < 1:
                raise ConfigError("intermediate_size must be >= 1: some layers use a dense MLP")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(
                f"partial_rotary_factor {self.partial_rotary_factor} x head_dim {self.head_dim} "
                f"gives rotary dim {self.rotary_dim}; it must be even and in 2..head_dim"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; Qwen3-Next uses 'silu'")
        if self.attention_bias:
            raise ConfigError("attention_bias=True is not supported; Qwen3-Next has no biases")
        _check_choice(self, "dtype", ("float32", "bfloat16", "float16"))
        _check_choice(self, "param_dtype", ("float32", "bfloat16"))
        _check_choice(self, "router_dtype", ("float32", "compute"))
        _check_choice(self, "delta_rule_impl", ("auto", "reference", "chunked", "pallas"))
        _check_choice(self, "attention_impl", ("auto", "blockwise", "splash", "mosaic_gpu", "xla"))
        _check_choice(self, "context_parallel_attention", ("zigzag", "contiguous"))
        _check_choice(self, "moe_impl", ("ragged", "dense"))
        _check_choice(self, "grouped_matmul", ("auto", "tokamax", "megablox", "ragged", "tiled"))
        _check_choice(self, "norm_style", ("zero_centred", "plain"))
        _check_choice(self, "router_init", ("normalised", "plain"))
        if not isinstance(self.attention_output_gate, bool):
            raise ConfigError(f"attention_output_gate must be true or false, got "
                              f"{self.attention_output_gate!r}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ConfigError(
                f"moe_capacity_factor must be > 0 or null (dropless), got {self.moe_capacity_factor}"
            )
        _check_choice(self, "remat_policy", ("none", "full", "dots"))
        _check_choice(self, "layer_scan", ("auto", "scan", "unroll"))
        if self.rope_scaling is not None and self.rope_scaling.rope_type != "yarn":
            raise ConfigError(
                f"rope_scaling.rope_type {self.rope_scaling.rope_type!r} is not supported; "
                "expected 'yarn' (or no rope_scaling)"
            )

    # ------------------------------------------------------------------ derived structure
    @property
    def mixer_types(self) -> tuple[str, ...]:
        """Per layer: explicit `layer_types`, else every `full_attention_interval`-th layer is
        full attention (HF's rule; the 80B model: layers 3, 7, ..., 47)."""
        if self.layer_types is not None:
            return self.layer_types
        return tuple(
            FULL_ATTENTION if (i + 1) % self.full_attention_interval == 0 else LINEAR_ATTENTION
            for i in range(self.num_hidden_layers)
        )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, index: int) -> bool:
        return (
            index not in self.mlp_only_layers
            and self.num_experts > 0
            and (index + 1) % self.decoder_sparse_step == 0
        )

    @property
    def layer_pattern(self) -> tuple[tuple[str, bool], ...]:
        """Per layer: (mixer type, uses MoE)."""
        return tuple((t, self.is_moe_layer(i)) for i, t in enumerate(self.mixer_types))

    @property
    def block_size(self) -> int:
        """Smallest period of the layer pattern; layers are stacked and scanned in such blocks.

        The 80B model is 12 repeats of (3 DeltaNet + 1 attention). A pattern with no shorter
        period is one block of all layers, which is correct, only not compile-time friendly.
        """
        pattern = self.layer_pattern
        n = len(pattern)
        for period in range(1, n + 1):
            if n % period == 0 and all(pattern[i] == pattern[i % period] for i in range(n)):
                return period
        return n

    @property
    def num_blocks(self) -> int:
        return self.num_hidden_layers // self.block_size

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def mtp_uses_moe(self) -> bool:
        # The MTP decoder layer is built with layer index 0, so the sparse-step rule applies to it.
        return self.num_experts > 0 and 1 % self.decoder_sparse_step == 0

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "model config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown key {key!r} in {where}{_did_you_mean(key, known)}")
        values = dict(values)
        for key in ("layer_types", "mlp_only_layers"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        if isinstance(values.get("rope_scaling"), dict):
            values["rope_scaling"] = _rope_scaling_from_dict(values["rope_scaling"])
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        """Reads the `model:` section of a preset in `configs/` (or a file of only model keys).

        The section may itself name a `preset` (a path relative to this file) that its other
        keys change: configs/small_all_attention.yaml is small.yaml with another layer pattern."""
        return cls.from_dict(read_model_section(path), where=f"{path} (model section)")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["layer_types"] = None if self.layer_types is None else list(self.layer_types)
        out["mlp_only_layers"] = list(self.mlp_only_layers)
        return out

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, path_or_dict: str | Path | dict, **overrides) -> "ModelConfig":
        from qnext_jax.hf_config import config_from_hf

        return config_from_hf(path_or_dict, **overrides)

    def to_hf(self, fmt: Literal["v4", "v5"] = "v5") -> dict[str, Any]:
        from qnext_jax.hf_config import config_to_hf

        return config_to_hf(self, fmt)

    # ------------------------------------------------------------------ accounting
    def param_counts(self) -> dict[str, int]:
        """Parameter counts from the tensor shapes (spec section 7)."""
        h = self.hidden_size
        dk, dv = self.linear_key_head_dim, self.linear_value_head_dim
        hk, hv = self.linear_num_key_heads, self.linear_num_value_heads
        key_dim, value_dim = hk * dk, hv * dv
        deltanet = (
            h * (2 * key_dim + 2 * value_dim) + h * 2 * hv
            + (2 * key_dim + value_dim) * self.linear_conv_kernel_dim
            + 2 * hv + dv + value_dim * h
        )
        q_heads, kv_heads, d = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        query_and_gate = 2 if self.attention_output_gate else 1
        attention = (h * q_heads * d * query_and_gate + 2 * h * kv_heads * d + q_heads * d * h
                     + 2 * d)
        moe = (
            h * self.num_experts
            + self.num_experts * 3 * h * self.moe_intermediate_size
            + 3 * h * self.shared_expert_intermediate_size + h
        )
        dense_mlp = 3 * h * self.intermediate_size
        trunk = 0
        for i, kind in enumerate(self.mixer_types):
            trunk += deltanet if kind == LINEAR_ATTENTION else attention
            trunk += moe if self.is_moe_layer(i) else dense_mlp
            trunk += 2 * h
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        mtp_layer = attention + (moe if self.mtp_uses_moe else dense_mlp) + 2 * h
        mtp = 0
        if self.mtp_num_hidden_layers:
            mtp = 2 * h * h + 3 * h + self.mtp_num_hidden_layers * mtp_layer
        main = embed + trunk + h + head
        return {"main": main, "mtp": mtp, "total": main + mtp}

    def active_params_per_token(self) -> int:
        """Parameters touched per token by the main model (top-k experts, no MTP, no embedding)."""
        c = self.param_counts()
        inactive_experts = self.num_experts - self.num_experts_per_tok
        per_expert = 3 * self.hidden_size * self.moe_intermediate_size
        return (
            c["main"] - self.vocab_size * self.hidden_size
            - self.num_moe_layers * inactive_experts * per_expert
        )

    def training_flops_per_token(self, seq_len: int, chunk_size: int = 64) -> float:
        """Model FLOPs of one training token (forward + backward = 3 x forward; recomputation
        not counted, as MFU conventions do) for rows of `seq_len` tokens.

        Forward: 2 FLOPs per multiply-add of every matmul weight the token touches (the top-k
        experts only; the LM head once for the main model and once per MTP depth; embedding
        lookups are free), plus causal attention (QK^T and PV over a mean context of
        (seq_len + 1) / 2 positions) and the chunked delta rule per value head (the in-chunk
        products over `chunk_size` positions and the three products with the dk x dv state).
        """
        h, c = self.hidden_size, self.param_counts()
        per_expert = 3 * h * self.moe_intermediate_size
        inactive = (self.num_experts - self.num_experts_per_tok) * per_expert
        # The embedding lookup is free; the LM head is a matmul, and with tied embeddings the
        # head *is* the table, which param_counts holds once: keep it then.
        lookup_only = 0 if self.tie_word_embeddings else self.vocab_size * h
        weights = c["main"] - lookup_only - self.num_moe_layers * inactive
        if self.mtp_num_hidden_layers:
            mtp_inactive = self.mtp_num_hidden_layers * inactive if self.mtp_uses_moe else 0
            weights += self.mtp_depth * (c["mtp"] - mtp_inactive + self.vocab_size * h)
        attention_layers = sum(kind == FULL_ATTENTION for kind in self.mixer_types)
        deltanet_layers = len(self.mixer_types) - attention_layers
        if self.mtp_num_hidden_layers:
            attention_layers += self.mtp_depth * self.mtp_num_hidden_layers
        context = (seq_len + 1) / 2
        attention = 4 * self.num_attention_heads * self.head_dim * context
        dk, dv = self.linear_key_head_dim, self.linear_value_head_dim
        delta_rule = self.linear_num_value_heads * (2 * chunk_size * (2 * dk + 2 * dv) + 6 * dk * dv)
        forward = 2 * weights + attention_layers * attention + deltanet_layers * delta_rule
        return 3.0 * forward


def read_model_section(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The model keys of a preset file, its own `preset` (relative to it) resolved first."""
    path = Path(path)
    data = read_yaml_mapping(path)
    section = dict(data.get("model", data))
    base = section.pop("preset", None)
    if base is None:
        return section
    base_path = path.parent / base
    if base_path.resolve() in _seen or base_path.resolve() == path.resolve():
        raise ConfigError(f"{path}: its model preset {base} leads back to itself")
    return {**read_model_section(base_path, _seen + (path.resolve(),)), **section}


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: {}); a missing file, invalid YAML or another
    kind of document is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def _check_choice(config: ModelConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise ConfigError(f"{name} is {getattr(config, name)!r}; expected one of {choices}")


def check_known_keys(values: dict[str, Any], cls, section: str) -> None:
    """Raises ConfigError for a key of `values` that is not a field of dataclass `cls`,
    naming it as `section.key` and suggesting the nearest field."""
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown key {section}.{key}{_did_you_mean(key, known)}; "
                              f"the keys are {sorted(known)}")


def _did_you_mean(key: str, known) -> str:
    close = nearest(key, sorted(known))
    return f" (did you mean {close!r}?)" if close else ""


def nearest(name: str, known: list[str]) -> str | None:
    """The valid key a user most likely meant: a close spelling, else an abbreviation
    (`lr` for `learning_rate`), else one that contains the name."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    for key in known:
        if "".join(part[0] for part in key.split("_") if part) == name:
            return key
    containing = [key for key in known if name in key]
    return containing[0] if containing else None


def _rope_scaling_from_dict(values: dict[str, Any]) -> RopeScaling:
    values = dict(values)
    if "type" in values and "rope_type" not in values:
        values["rope_type"] = values.pop("type")
    values.pop("type", None)
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown key {key!r} in rope_scaling{_did_you_mean(key, known)}")
    scaling = RopeScaling(**values)
    if not (scaling.factor and math.isfinite(scaling.factor) and scaling.factor >= 1.0):
        raise ConfigError(f"rope_scaling.factor must be >= 1, got {scaling.factor}")
    return scaling
