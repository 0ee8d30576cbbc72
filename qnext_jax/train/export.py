"""A run in Hugging Face format: config.json, the weights, the tokenizer files and a
generation config, a folder that `transformers` loads and generates with as it would a
published model. At the end of a run (`train.export_hf`: run_dir/hf), or from any complete
checkpoint of a run, a preempted one's too (`python -m qnext_jax.convert export RUN_DIR
[--step N]`: run_dir/hf-step<N>)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from qnext_jax.config import ConfigError
from qnext_jax.convert.publish import tokenizer_origin, write_generation_config, write_tokenizer_files
from qnext_jax.convert.run_checkpoint import complete_steps, load_run_checkpoint
from qnext_jax.convert.save import save_hf_checkpoint
from qnext_jax.data.build import TOKENIZER_FILE
from qnext_jax.data.tokenizer import load_tokenizer


def export_dtype(config) -> str:
    """train.export_dtype, else the dtype the model computed in: a bf16-trained model is
    published in bf16 (half the bytes; its fp32 master weights stay in the checkpoints)."""
    return _export_dtype(config.train.export_dtype, config.model.dtype)


def _export_dtype(chosen: str | None, compute_dtype: str) -> str:
    if chosen is not None:
        return chosen
    return "bfloat16" if compute_dtype == "bfloat16" else "float32"


def export_hf(trainer, state, config, run_dir: Path, tokenizer) -> Path:
    """Writes run_dir/hf from `state` (process 0 writes; with several processes every process
    takes part in gathering each tensor)."""
    model = nnx.merge(trainer.graphdef, state.params)
    fetch = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        fetch = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    origin = tokenizer_origin(config.train.init_from_hf, config.data.tokenizer)
    return _write(model, run_dir / "hf", export_dtype(config), tokenizer, origin, fetch=fetch,
                  write=jax.process_index() == 0)


def export_run_checkpoint(run_dir, step: int | None = None, out=None, dtype: str | None = None,
                          max_shard_bytes: int = 2 << 30) -> Path:
    """Writes the checkpoint of `step` (default: the latest) of `run_dir` as a Hugging Face
    folder, `out` (default run_dir/hf-step<step>), in `dtype` (default: as train.export_hf
    would). Returns the folder."""
    run_dir = Path(run_dir).expanduser().absolute()
    tokenizer_file = run_dir / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise ConfigError(f"run directory {run_dir} has no {TOKENIZER_FILE}")
    steps = complete_steps(run_dir)
    if step is None and steps:
        step = steps[-1]
    directory = Path(out).expanduser().absolute() if out else run_dir / f"hf-step{step}"
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory} exists and is not an empty directory; pass another --out")
    model, step, values = load_run_checkpoint(run_dir, step)  # checks the step
    train, data = values.get("train", {}), values.get("data", {})
    dtype = _export_dtype(dtype or train.get("export_dtype"), model.config.dtype)
    origin = tokenizer_origin(train.get("init_from_hf"), data.get("tokenizer"))
    return _write(model, directory, dtype, load_tokenizer(tokenizer_file), origin,
                  max_shard_bytes=max_shard_bytes)


def _write(model, directory: Path, dtype: str, tokenizer, origin, *, fetch=None, write=True,
           max_shard_bytes: int = 2 << 30) -> Path:
    save_hf_checkpoint(model, directory, dtype=dtype, fetch=fetch, write=write,
                       max_shard_bytes=max_shard_bytes)
    if write:
        write_tokenizer_files(directory, tokenizer, origin, model.config.max_position_embeddings)
        write_generation_config(directory, model.config, tokenizer.end_of_text_id, origin)
    return directory
