"""When generation stops, and how it samples by default, as a model directory says.

A row stops at any of the model's end tokens: the config's `eos_token_id` (an id or a list),
`generation_config.json`'s `eos_token_id` (the released Instruct model lists `<|im_end|>` and
`<|endoftext|>` there), and the tokenizer's end-of-text; or at a user's stop string. Stop ids
are checked on the device every step; stop strings need the text, so the host checks them as it
reads the tokens back and cuts the text before the string.
"""

from __future__ import annotations

import json
from pathlib import Path

from qnext_jax.config import ConfigError

GENERATION_CONFIG = "generation_config.json"


def _ids(value, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConfigError(f"{where}: eos_token_id must be a token id or a list of them, got "
                          f"{value!r}")
    return list(values)


def read_generation_config(directory) -> dict:
    """generation_config.json of a model directory ({} when there is none)."""
    path = Path(directory) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def stop_token_ids(model_config, generation_config: dict, end_of_text_id=None) -> tuple[int, ...]:
    """Every id that ends a row: the model config's eos, generation_config's, end-of-text."""
    ids = _ids(model_config.eos_token_id, "the model config")
    ids += _ids(generation_config.get("eos_token_id"), GENERATION_CONFIG)
    ids += [] if end_of_text_id is None else [int(end_of_text_id)]
    return tuple(sorted(set(ids)))


def sampling_defaults(generation_config: dict) -> dict:
    """temperature / top_k / top_p as generation_config.json sets them (greedy unless it says
    do_sample), in SamplingSettings' terms; a user's flags override them."""
    if not generation_config.get("do_sample", False):
        return {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    return {"temperature": float(generation_config.get("temperature", 1.0)),
            "top_k": int(generation_config.get("top_k", 0) or 0),
            "top_p": float(generation_config.get("top_p", 1.0) or 1.0)}


def cut_at_stop_strings(text: str, stops) -> tuple[str, bool]:
    """(text before the first stop string, whether one occurred)."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    if not positions:
        return text, False
    return text[: min(positions)], True
