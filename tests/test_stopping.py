"""What ends a row and how sampling defaults, from a model directory: the config's and
generation_config.json's end ids (an id or a list), the tokenizer's end-of-text, stop strings."""

import json
from types import SimpleNamespace

import pytest

from qnext_jax.config import ConfigError
from qnext_jax.generate.stopping import (
    cut_at_stop_strings, read_generation_config, sampling_defaults, stop_token_ids,
)


def test_stop_ids_join_every_source(tmp_path):
    # The Instruct release: config.json eos 151645, generation_config.json [151645, 151643].
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [151645, 151643], "do_sample": True, "temperature": 0.7, "top_k": 20,
         "top_p": 0.8}))
    generation = read_generation_config(tmp_path)
    assert stop_token_ids(SimpleNamespace(eos_token_id=151645), generation, 151643) == (
        151643, 151645)
    assert stop_token_ids(SimpleNamespace(eos_token_id=[1, 2]), {}, None) == (1, 2)
    assert sampling_defaults(generation) == {"temperature": 0.7, "top_k": 20, "top_p": 0.8}
    assert sampling_defaults({}) == {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    assert read_generation_config(tmp_path / "none") == {}


def test_bad_generation_configs_say_what_is_wrong(tmp_path):
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="generation_config.json is not valid JSON"):
        read_generation_config(tmp_path)
    with pytest.raises(ConfigError, match="eos_token_id must be a token id or a list"):
        stop_token_ids(SimpleNamespace(eos_token_id=None), {"eos_token_id": ["</s>"]})


def test_text_is_cut_before_the_first_stop_string():
    assert cut_at_stop_strings("a = 1\n\nb = 2\n\n", ["\n\n", "b"]) == ("a = 1", True)
    assert cut_at_stop_strings("a = 1", ["zz", ""]) == ("a = 1", False)
