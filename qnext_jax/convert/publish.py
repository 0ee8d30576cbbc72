"""What a Hugging Face model folder holds beside config.json and the weights, so that
`AutoTokenizer`, `GenerationConfig` and `generate` work on it as on a published model: the
tokenizer files and a generation config.

Files that came with the model (a `train.init_from_hf` directory, or the folder of the
tokenizer.json a run used) are copied as they are: Qwen's tokenizer_config.json carries its
special tokens and chat template, its generation_config.json the sampling defaults (with the
token ids it lacks filled in). A model trained with our own tokenizer gets files written from
what we know of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qnext_jax.config import ModelConfig

TOKENIZER_FILE = "tokenizer.json"
# Beside tokenizer.json in a Qwen release; copied when present.
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                        "vocab.json", "merges.txt")
GENERATION_FILE = "generation_config.json"
END_OF_TEXT = "<|endoftext|>"


def write_tokenizer_files(directory: Path, tokenizer, origin: Path | None,
                          model_max_length: int) -> None:
    """tokenizer: the run's (anything with `save(path)`)."""
    directory = Path(directory)
    tokenizer.save(directory / TOKENIZER_FILE)
    companions = [origin / name for name in TOKENIZER_COMPANIONS
                  if origin is not None and (origin / name).is_file()]
    if any(path.name == "tokenizer_config.json" for path in companions):
        for path in companions:
            shutil.copyfile(path, directory / path.name)
        return
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": END_OF_TEXT,
        "pad_token": END_OF_TEXT,  # documents are separated, and batches padded, by it
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_generation_config(directory: Path, config: ModelConfig, end_of_text_id: int,
                            origin: Path | None) -> None:
    """The origin's generation config (its sampling defaults) with the token ids it lacks
    filled in, else a greedy one; generation stops at end-of-text unless the model names
    another eos."""
    generation = {}
    if origin is not None and (origin / GENERATION_FILE).is_file():
        generation = json.loads((origin / GENERATION_FILE).read_text())
    eos = config.eos_token_id if config.eos_token_id is not None else end_of_text_id
    defaults = {"bos_token_id": config.bos_token_id, "eos_token_id": eos,
                "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
                "do_sample": False}
    for key, value in defaults.items():
        if generation.get(key) is None:
            generation[key] = value
    (Path(directory) / GENERATION_FILE).write_text(json.dumps(generation, indent=2))


def tokenizer_origin(init_from_hf: str | None, tokenizer: str | None) -> Path | None:
    """The folder whose tokenizer/generation files describe the run's model, if any."""
    if init_from_hf:
        return Path(init_from_hf).expanduser()
    if tokenizer:
        path = Path(tokenizer).expanduser()
        return path if path.is_dir() else path.parent
    return None
