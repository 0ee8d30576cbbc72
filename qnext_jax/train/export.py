"""The end of a run in Hugging Face format (`train.export_hf`): run_dir/hf with config.json,
the weights in the run's dtype, the tokenizer files and a generation config, a folder that
`transformers` loads and generates with as it would a published model."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from qnext_jax.convert.publish import tokenizer_origin, write_generation_config, write_tokenizer_files
from qnext_jax.convert.save import save_hf_checkpoint


def export_dtype(config) -> str:
    """train.export_dtype, else the dtype the model computed in: a bf16-trained model is
    published in bf16 (half the bytes; its fp32 master weights stay in the checkpoints)."""
    if config.train.export_dtype is not None:
        return config.train.export_dtype
    return "bfloat16" if config.model.dtype == "bfloat16" else "float32"


def export_hf(trainer, state, config, run_dir: Path, tokenizer) -> Path:
    """Writes run_dir/hf from `state` (process 0 writes; with several processes every process
    takes part in gathering each tensor)."""
    directory = run_dir / "hf"
    model = nnx.merge(trainer.graphdef, state.params)
    fetch = None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        fetch = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
    write = jax.process_index() == 0
    save_hf_checkpoint(model, directory, dtype=export_dtype(config), fetch=fetch, write=write)
    if write:
        origin = tokenizer_origin(config.train.init_from_hf, config.data.tokenizer)
        write_tokenizer_files(directory, tokenizer, origin, config.model.max_position_embeddings)
        write_generation_config(directory, config.model, tokenizer.end_of_text_id, origin)
    return directory
