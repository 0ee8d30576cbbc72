"""qnext_jax model -> Hugging Face directory that `transformers` loads (per-expert layout on
disk, as every HF version writes it), written tensor by tensor in bounded shards."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from qnext_jax.convert.layout import checkpoint_rules
from qnext_jax.convert.safetensors_dir import ShardedWriter

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, None: None}


def save_hf_checkpoint(model, directory, *, dtype: str | None = None, config_format: str = "v5",
                       max_shard_bytes: int = 2 << 30, fetch=None, write: bool = True) -> Path:
    """Writes config.json and the weights. dtype None keeps each parameter's own dtype.

    fetch: device array -> host array (default `jax.device_get`; a multi-process run passes a
    gather that every process calls, and only the process with `write` True writes files)."""
    fetch = fetch or jax.device_get
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    directory = Path(directory)
    config = model.config
    leaves = {path: variable.value for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    writer = ShardedWriter(directory, max_shard_bytes) if write else None
    for rule in checkpoint_rules(config):
        parts = [np.asarray(fetch(leaves[path][index])) for path, index in rule.targets]
        if writer is None:
            continue
        array = rule.to_hf(parts)
        if _DTYPES[dtype] is not None:
            array = array.astype(_DTYPES[dtype])
        writer.add(rule.hf_name, array)
    if writer is None:
        return directory
    writer.close()
    hf_config = config.to_hf(config_format)
    if dtype is not None:
        hf_config["torch_dtype"] = dtype
    hf_config["dtype"] = hf_config["torch_dtype"]  # the name transformers>=5 writes and reads
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2))
    return directory
