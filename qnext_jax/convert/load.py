"""Hugging Face safetensors -> qnext_jax model, streaming one tensor at a time.

Peak memory is the target parameters (plus one source tensor), not twice the model: every HF
tensor is read memory-mapped, re-indexed, and written straight into its place in the block of
the device that holds it (`jax.make_array_from_callback`), one parameter at a time.
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
from qnext_jax.model import Qwen3NextModel, abstract_model

log = logging.getLogger(__name__)

def read_hf_config(directory, files: SafetensorsDir, param_dtype, **overrides) -> ModelConfig:
    config = ModelConfig.from_hf(Path(directory).expanduser().absolute(), **overrides)
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
    config's `dtype`; default: the checkpoint's, config.json `dtype` / `torch_dtype`). shardings: optional function from a parameter
    path to the sharding its array is placed on. config_overrides: ModelConfig fields that are
    not in config.json (e.g. delta_rule_impl="reference", mtp_depth=2).
    """
    files = SafetensorsDir(directory)
    if compute_dtype is not None:
        config_overrides["dtype"] = jnp.dtype(compute_dtype).name
    config = read_hf_config(directory, files, dtype, **config_overrides)
    graphdef, abstract_state = nnx.split(abstract_model(config))
    state = load_hf_state(files, config, abstract_state, shardings)
    return nnx.merge(graphdef, state)


def load_hf_state(files: SafetensorsDir, config: ModelConfig, abstract_state,
                  shardings: Callable[[tuple], jax.sharding.Sharding | None] | None = None):
    """The model's parameters (the leaves of `abstract_state`, an nnx.State of
    ShapeDtypeStructs) read from `files`, each built shard by shard on its devices.

    Every device's block of a leaf is assembled from just the HF tensors that land in it (an
    expert-sharded leaf reads only that device's experts), so no process ever holds more than
    one leaf's local shards on the host: never an unsharded copy of the model, and in a
    multi-process run each process reads only what its devices hold.
    """
    rules = match_rules(config, files)
    leaves = dict(nnx.to_flat_state(abstract_state))
    by_leaf: dict[tuple, list[TensorRule]] = {}
    for rule in rules:
        for path, _ in rule.targets:
            if path not in leaves:
                raise CheckpointError(f"internal: rule for {rule.hf_name} targets unknown {path}")
            by_leaf.setdefault(path, [])
            if rule not in by_leaf[path]:
                by_leaf[path].append(rule)

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat = []
    for path, variable in leaves.items():
        dtype = np.dtype(variable.value.dtype)  # the model's (A_log, dt_bias: always fp32)
        shape = variable.value.shape
        sharding = (shardings(path) if shardings is not None else None) or default
        built: dict[tuple, np.ndarray] = {}  # replicated shards are assembled once

        def shard(index, path=path, shape=shape, dtype=dtype):
            bounds = tuple(sl.indices(n)[:2] for sl, n in zip(index, shape))
            if bounds not in built:
                built[bounds] = _assemble(path, shape, dtype, bounds, by_leaf.get(path, []), files)
            return built[bounds]

        array = jax.make_array_from_callback(shape, sharding, shard)
        built.clear()
        flat.append((path, variable.replace(array)))
    return nnx.from_flat_state(flat)


def _assemble(path, shape, dtype, bounds, rules: list[TensorRule], files: SafetensorsDir):
    """The block `bounds` ((start, stop) per axis) of leaf `path`, from the rules filling it.
    A rule fills the leaf at an index into its leading (stacked: block, expert) axes; a rule
    filling several leaves (in_proj_qkvz) is read once per block it lands in."""
    out = np.zeros(tuple(stop - start for start, stop in bounds), dtype)
    filled = 0
    for rule in rules:
        for position, (target, index) in enumerate(rule.targets):
            if target != path:
                continue
            lead = len(index)
            if not all(start <= i < stop for i, (start, stop) in zip(index, bounds[:lead])):
                continue
            part = rule.to_ours(files.read(rule.hf_name))[position]
            block = part[tuple(slice(start, stop) for start, stop in bounds[lead:])]
            out[tuple(i - start for i, (start, _) in zip(index, bounds[:lead]))] = block
            filled += block.size
    if filled != out.size:
        raise CheckpointError(
            f"internal: parameter {path} block {bounds} filled {filled} of {out.size} values")
    return out
