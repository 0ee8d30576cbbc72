"""Where every Hugging Face tensor lives in our parameters, and how to get there and back.

One `TensorRule` per HF tensor name: the HF shape, the parameter leaves it fills (a path in the
NNX state plus an index into that leaf's leading stacked axes: the block repeat for scanned
layers, the expert for per-expert weights), and the two pure re-indexings between the layouts.
Loading and saving both read this one table, so the round trip is exact by construction and
tested as such.

HF linear weights are [out, in] (y = x W^T); ours are [in, ...out axes...].
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from qnext_jax.config import FULL_ATTENTION, LINEAR_ATTENTION, ConfigError, ModelConfig

Path = tuple  # a path in the NNX state, e.g. ("blocks", "layers", 0, "mixer", "q_proj")


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf_name: str
    hf_shape: tuple[int, ...]
    targets: tuple[tuple[Path, tuple[int, ...]], ...]  # (leaf path, index into leading axes)
    to_ours: Callable[[np.ndarray], list[np.ndarray]]  # HF array -> one array per target
    to_hf: Callable[[list[np.ndarray]], np.ndarray]  # arrays per target -> HF array


def _linear(target: Path, index: tuple, hf_name: str, out_shape: tuple, in_dim: int) -> TensorRule:
    """HF [prod(out_shape), in] <-> ours [in, *out_shape]."""
    out_size = int(np.prod(out_shape))
    return TensorRule(
        hf_name, (out_size, in_dim), ((target, index),),
        lambda w: [w.T.reshape(in_dim, *out_shape)],
        lambda parts: parts[0].reshape(in_dim, out_size).T,
    )


def _linear_in_heads(target: Path, index: tuple, hf_name: str, in_shape: tuple, out_dim: int):
    """HF [out, prod(in_shape)] <-> ours [*in_shape, out] (output projections)."""
    in_size = int(np.prod(in_shape))
    return TensorRule(
        hf_name, (out_dim, in_size), ((target, index),),
        lambda w: [w.T.reshape(*in_shape, out_dim)],
        lambda parts: parts[0].reshape(in_size, out_dim).T,
    )


def _same(target: Path, index: tuple, hf_name: str, shape: tuple) -> TensorRule:
    return TensorRule(hf_name, shape, ((target, index),), lambda w: [w], lambda parts: parts[0])


def _rms_norm(c: ModelConfig, target: Path, index: tuple, hf_name: str, size: int) -> TensorRule:
    """HF stores zero-centred weights (scale 1 + w). A plain-norm model (scale w) converts as
    w - 1 and back, the same function: the switch needs no config field there."""
    if c.norm_style == "zero_centred":
        return _same(target, index, hf_name, (size,))
    # In fp32: 1 + w rounded to a bf16 checkpoint's dtype would lose w's low bits (bf16 steps
    # near 1 are 2^-7). The loader and the writer cast to the dtypes asked for.
    shift = lambda w, by: np.asarray(w, np.float32) + np.float32(by)
    return TensorRule(hf_name, (size,), ((target, index),),
                      lambda w: [shift(w, 1)], lambda parts: shift(parts[0], -1))


def _gated_deltanet(c: ModelConfig, hf: str, ours: Path, index: tuple) -> list[TensorRule]:
    hidden = c.hidden_size
    key_heads, value_heads = c.linear_num_key_heads, c.linear_num_value_heads
    key_dim, value_dim, width = c.linear_key_head_dim, c.linear_value_head_dim, c.linear_conv_kernel_dim
    group = value_heads // key_heads
    block = 2 * key_dim + 2 * group * value_dim  # in_proj_qkvz rows per key head (spec 2.2)
    splits = np.cumsum([key_dim, key_dim, group * value_dim])
    names = ("q_proj", "k_proj", "v_proj", "z_proj")

    def qkvz_to_ours(w):
        q, k, v, z = np.split(w.reshape(key_heads, block, hidden), splits, axis=1)
        as_heads = lambda x, heads, dim: x.reshape(heads, dim, hidden).transpose(2, 0, 1)
        return [as_heads(q, key_heads, key_dim), as_heads(k, key_heads, key_dim),
                as_heads(v, value_heads, value_dim), as_heads(z, value_heads, value_dim)]

    def qkvz_to_hf(parts):
        q, k, v, z = (p.transpose(1, 2, 0) for p in parts)  # [heads, dim, hidden]
        grouped = lambda x: x.reshape(key_heads, -1, hidden)
        return np.concatenate([q, k, grouped(v), grouped(z)], axis=1).reshape(-1, hidden)

    def ba_to_ours(w):
        b, a = np.split(w.reshape(key_heads, 2 * group, hidden), [group], axis=1)
        return [b.reshape(value_heads, hidden).T, a.reshape(value_heads, hidden).T]

    def ba_to_hf(parts):
        b, a = (p.T.reshape(key_heads, group, hidden) for p in parts)
        return np.concatenate([b, a], axis=1).reshape(2 * value_heads, hidden)

    # conv1d channels are contiguous [q (all heads) | k | v]; weight [C, 1, K] -> ours [K, heads, dim].
    conv_shapes = ((key_heads, key_dim), (key_heads, key_dim), (value_heads, value_dim))
    conv_splits = np.cumsum([key_heads * key_dim, key_heads * key_dim])

    def conv_to_ours(w):
        parts = np.split(w[:, 0, :], conv_splits, axis=0)
        return [p.T.reshape(width, *shape) for p, shape in zip(parts, conv_shapes)]

    def conv_to_hf(parts):
        return np.concatenate([p.reshape(width, -1).T for p in parts], axis=0)[:, None, :]

    conv_channels = 2 * key_heads * key_dim + value_heads * value_dim
    target = lambda name: (ours + (name,), index)
    return [
        TensorRule(f"{hf}in_proj_qkvz.weight", (key_heads * block, hidden),
                   tuple(target(n) for n in names), qkvz_to_ours, qkvz_to_hf),
        TensorRule(f"{hf}in_proj_ba.weight", (2 * value_heads, hidden),
                   (target("b_proj"), target("a_proj")), ba_to_ours, ba_to_hf),
        TensorRule(f"{hf}conv1d.weight", (conv_channels, 1, width),
                   (target("conv_q"), target("conv_k"), target("conv_v")), conv_to_ours, conv_to_hf),
        _same(ours + ("dt_bias",), index, f"{hf}dt_bias", (value_heads,)),
        _same(ours + ("A_log",), index, f"{hf}A_log", (value_heads,)),
        _same(ours + ("norm", "weight"), index, f"{hf}norm.weight", (value_dim,)),
        _linear_in_heads(ours + ("out_proj",), index, f"{hf}out_proj.weight",
                         (value_heads, value_dim), hidden),
    ]


def _attention(c: ModelConfig, hf: str, ours: Path, index: tuple) -> list[TensorRule]:
    hidden, heads, kv_heads, dim = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def q_to_ours(w):  # rows per head: [query (dim) | gate (dim)]
        q, gate = np.split(w.reshape(heads, 2 * dim, hidden), 2, axis=1)
        return [q.transpose(2, 0, 1), gate.transpose(2, 0, 1)]

    def q_to_hf(parts):
        q, gate = (p.transpose(1, 2, 0) for p in parts)
        return np.concatenate([q, gate], axis=1).reshape(2 * heads * dim, hidden)

    return [
        TensorRule(f"{hf}q_proj.weight", (2 * heads * dim, hidden),
                   ((ours + ("q_proj",), index), (ours + ("gate_proj",), index)), q_to_ours, q_to_hf),
        _linear(ours + ("k_proj",), index, f"{hf}k_proj.weight", (kv_heads, dim), hidden),
        _linear(ours + ("v_proj",), index, f"{hf}v_proj.weight", (kv_heads, dim), hidden),
        _linear_in_heads(ours + ("o_proj",), index, f"{hf}o_proj.weight", (heads, dim), hidden),
        _rms_norm(c, ours + ("q_norm", "weight"), index, f"{hf}q_norm.weight", dim),
        _rms_norm(c, ours + ("k_norm", "weight"), index, f"{hf}k_norm.weight", dim),
    ]


def _swiglu(hf: str, ours: Path, index: tuple, hidden: int, width: int) -> list[TensorRule]:
    return [
        _linear(ours + ("gate_proj",), index, f"{hf}gate_proj.weight", (width,), hidden),
        _linear(ours + ("up_proj",), index, f"{hf}up_proj.weight", (width,), hidden),
        _linear_in_heads(ours + ("down_proj",), index, f"{hf}down_proj.weight", (width,), hidden),
    ]


def _moe(c: ModelConfig, hf: str, ours: Path, index: tuple, fused: bool) -> list[TensorRule]:
    hidden, experts, width = c.hidden_size, c.num_experts, c.moe_intermediate_size
    rules = [_linear(ours + ("router",), index, f"{hf}gate.weight", (experts,), hidden)]
    if fused:  # transformers>=5 in-memory layout: gate_up [X, 2F, E] (gate rows first), down [X, E, F]
        rules.append(TensorRule(
            f"{hf}experts.gate_up_proj", (experts, 2 * width, hidden),
            ((ours + ("gate_proj",), index), (ours + ("up_proj",), index)),
            lambda w: [w[:, :width].transpose(0, 2, 1), w[:, width:].transpose(0, 2, 1)],
            lambda parts: np.concatenate([p.transpose(0, 2, 1) for p in parts], axis=1),
        ))
        rules.append(TensorRule(
            f"{hf}experts.down_proj", (experts, hidden, width), ((ours + ("down_proj",), index),),
            lambda w: [w.transpose(0, 2, 1)], lambda parts: parts[0].transpose(0, 2, 1),
        ))
    else:
        for e in range(experts):
            rules += _swiglu(f"{hf}experts.{e}.", ours, index + (e,), hidden, width)
    rules += _swiglu(f"{hf}shared_expert.", ours + ("shared_expert",), index, hidden,
                     c.shared_expert_intermediate_size)
    rules.append(TensorRule(
        f"{hf}shared_expert_gate.weight", (1, hidden), ((ours + ("shared_expert_gate",), index),),
        lambda w: [w[0]], lambda parts: parts[0][None, :],
    ))
    return rules


def _decoder_layer(c: ModelConfig, hf: str, ours: Path, index: tuple, mixer: str, moe: bool,
                   fused_experts: bool) -> list[TensorRule]:
    rules = [
        _rms_norm(c, ours + ("input_layernorm", "weight"), index, f"{hf}input_layernorm.weight",
                  c.hidden_size),
        _rms_norm(c, ours + ("post_attention_layernorm", "weight"), index,
                  f"{hf}post_attention_layernorm.weight", c.hidden_size),
    ]
    if mixer == LINEAR_ATTENTION:
        rules += _gated_deltanet(c, f"{hf}linear_attn.", ours + ("mixer",), index)
    else:
        rules += _attention(c, f"{hf}self_attn.", ours + ("mixer",), index)
    if moe:
        rules += _moe(c, f"{hf}mlp.", ours + ("mlp",), index, fused_experts)
    else:
        rules += _swiglu(f"{hf}mlp.", ours + ("mlp",), index, c.hidden_size, c.intermediate_size)
    return rules


def checkpoint_rules(config: ModelConfig, fused_experts: bool = False) -> list[TensorRule]:
    """Every HF tensor of a checkpoint for `config`, in file order."""
    c = config
    if not c.attention_output_gate:
        raise ConfigError(
            "attention_output_gate=False has no Hugging Face equivalent (Qwen3NextForCausalLM "
            "always gates its attention output); such a model cannot be converted")
    hidden, vocab = c.hidden_size, c.vocab_size
    rules = [_same(("embed",), (), "model.embed_tokens.weight", (vocab, hidden))]
    for i, (mixer, moe) in enumerate(c.layer_pattern):
        repeat, position = divmod(i, c.block_size)
        rules += _decoder_layer(c, f"model.layers.{i}.", ("blocks", "layers", position), (repeat,),
                                mixer, moe, fused_experts)
    rules.append(_rms_norm(c, ("final_norm", "weight"), (), "model.norm.weight", hidden))
    if not c.tie_word_embeddings:
        rules.append(_linear(("lm_head",), (), "lm_head.weight", (vocab,), hidden))
    if c.mtp_num_hidden_layers:
        rules += [
            _linear(("mtp", "fc"), (), "mtp.fc.weight", (hidden,), 2 * hidden),
            _rms_norm(c, ("mtp", "pre_fc_norm_embedding", "weight"), (),
                      "mtp.pre_fc_norm_embedding.weight", hidden),
            _rms_norm(c, ("mtp", "pre_fc_norm_hidden", "weight"), (), "mtp.pre_fc_norm_hidden.weight",
                      hidden),
            _rms_norm(c, ("mtp", "norm", "weight"), (), "mtp.norm.weight", hidden),
        ]
        for m in range(c.mtp_num_hidden_layers):
            rules += _decoder_layer(c, f"mtp.layers.{m}.", ("mtp", "layers", m), (), FULL_ATTENTION,
                                    c.mtp_uses_moe, fused_experts)
    return rules
