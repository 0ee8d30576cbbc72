"""Hugging Face safetensors -> qnext_jax model, streaming one tensor at a time.

Peak memory is the target parameters (plus one source tensor), not twice the model: every HF
tensor is read memory-mapped, re-indexed, and written straight into its place in a
pre-allocated buffer of the final dtype; each finished buffer becomes a device array (placed on
its sharding when one is given) and is freed before the next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qnext_jax.config import ModelConfig
from qnext_jax.convert.layout import TensorRule, checkpoint_rules
from qnext_jax.convert.safetensors_dir import CheckpointError, SafetensorsDir
from qnext_jax.model import Qwen3NextModel

log = logging.getLogger(__name__)

# Parameters kept in fp32 whatever the requested dtype: they feed g and the delta-rule state.
_ALWAYS_FP32 = ("A_log", "dt_bias")


def abstract_model(config: ModelConfig) -> Qwen3NextModel:
    """The model with ShapeDtypeStructs for parameters: nothing is allocated."""
    return nnx.eval_shape(lambda: Qwen3NextModel(config, rngs=nnx.Rngs(0)))


def read_hf_config(directory, files: SafetensorsDir, param_dtype, **overrides) -> ModelConfig:
    config = ModelConfig.from_hf(Path(directory), **overrides)
    has_mtp = any(name.startswith("mtp.") for name in files.names())
    if config.mtp_num_hidden_layers and not has_mtp and "mtp_num_hidden_layers" not in overrides:
        # transformers drops mtp.* on save; such a checkpoint simply has no MTP module.
        log.info("%s holds no mtp.* tensors: loading without the MTP module", directory)
        config = config.replace(mtp_num_hidden_layers=0)
    param_dtype = jnp.dtype(param_dtype).name
    if param_dtype not in ("float32", "bfloat16"):
        raise CheckpointError(f"dtype must be float32 or bfloat16, got {param_dtype}")
    return config.replace(param_dtype=param_dtype)


def match_rules(config: ModelConfig, files: SafetensorsDir) -> list[TensorRule]:
    """The rules for this checkpoint's expert layout; every mismatch is named."""
    fused = any(name.endswith("mlp.experts.gate_up_proj") for name in files.names())
    rules = checkpoint_rules(config, fused_experts=fused)
    expected = {rule.hf_name for rule in rules}
    present = files.names()
    missing = sorted(expected - present)
    unexpected = sorted(present - expected)
    if missing:
        raise CheckpointError(
            f"checkpoint {files.directory} is missing {len(missing)} tensor(s) the config needs, "
            f"e.g. {missing[:5]}"
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint {files.directory} holds {len(unexpected)} tensor(s) the config does not "
            f"describe, e.g. {unexpected[:5]}"
        )
    for rule in rules:
        actual = files.shape(rule.hf_name)
        if actual != rule.hf_shape:
            raise CheckpointError(
                f"tensor {rule.hf_name} has shape {list(actual)}; the config expects "
                f"{list(rule.hf_shape)}"
            )
    return rules


def load_hf_checkpoint(
    directory,
    dtype=jnp.float32,
    *,
    compute_dtype: str | None = None,
    shardings: Callable[[tuple], jax.sharding.Sharding | None] | None = None,
    **config_overrides,
) -> Qwen3NextModel:
    """Loads a HF Qwen3-Next directory (config.json + safetensors, single file or indexed).

    dtype: parameter dtype (float32 or bfloat16). compute_dtype: activation dtype (the
    config's `dtype`; default float32). shardings: optional function from a parameter
    path to the sharding its array is placed on. config_overrides: ModelConfig fields that are
    not in config.json (e.g. delta_rule_impl="reference", mtp_depth=2).
    """
    files = SafetensorsDir(directory)
    if compute_dtype is not None:
        config_overrides["dtype"] = jnp.dtype(compute_dtype).name
    config = read_hf_config(directory, files, dtype, **config_overrides)
    rules = match_rules(config, files)
    graphdef, abstract_state = nnx.split(abstract_model(config))
    leaves = dict(nnx.to_flat_state(abstract_state))
    by_leaf: dict[tuple, list[TensorRule]] = {}
    for rule in rules:
        for path, _ in rule.targets:
            if path not in leaves:
                raise CheckpointError(f"internal: rule for {rule.hf_name} targets unknown {path}")
            by_leaf.setdefault(path, [])
            if rule not in by_leaf[path]:
                by_leaf[path].append(rule)

    # Fill leaf by leaf, in the order the leaves appear, so only one buffer is alive at a time
    # besides the finished device arrays. A rule filling several leaves (in_proj_qkvz) is read
    # once per leaf it fills: a little more reading, never a second copy of the model.
    flat = []
    for path, variable in leaves.items():
        target_dtype = jnp.float32 if path[-1] in _ALWAYS_FP32 else variable.value.dtype
        buffer = np.zeros(variable.value.shape, target_dtype)
        filled = 0
        for rule in by_leaf.get(path, []):
            parts = rule.to_ours(files.read(rule.hf_name))
            for (target, index), part in zip(rule.targets, parts):
                if target == path:
                    buffer[index] = part
                    filled += part.size
        if filled != buffer.size:
            raise CheckpointError(f"internal: parameter {path} filled {filled} of {buffer.size} values")
        sharding = shardings(path) if shardings is not None else None
        array = jax.device_put(buffer, sharding) if sharding is not None else jnp.asarray(buffer)
        del buffer
        flat.append((path, variable.replace(array)))
    state = nnx.from_flat_state(flat)
    return nnx.merge(graphdef, state)
