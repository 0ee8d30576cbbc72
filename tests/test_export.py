"""A model exported to Hugging Face format is one people would publish: weights in the dtype it
computed in (bf16 for a bf16 release: the round trip is bit-exact), its tokenizer files and a
generation config, loaded and generated with by `transformers` itself."""

import json

import pytest

torch = pytest.importorskip("torch")  # the reference; absent on Python 3.12 (.ci/run)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hf_reference import random_hf_model
from qnext_jax.config import ModelConfig
from qnext_jax.convert import load_hf_checkpoint, save_hf_checkpoint
from qnext_jax.convert.publish import (tokenizer_origin, write_generation_config,
                                       write_tokenizer_files)
from qnext_jax.data.tokenizer import load_tokenizer
from qnext_jax.train.export import export_dtype
from qnext_jax.train.run_config import load_run_config


def word_tokenizer(path, size):
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(size - 2)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


def test_a_bf16_release_trains_in_bf16_and_exports_in_bf16(tmp_path):
    release = tmp_path / "release"
    original = random_hf_model("gqa", seed=3, stress=False).to(torch.bfloat16)
    original.save_pretrained(release)
    word_tokenizer(release / "tokenizer.json", original.config.vocab_size)
    chat = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    (release / "tokenizer_config.json").write_text(json.dumps(chat))

    # The checkpoint's dtype sets the compute dtype of a run started from it, unless set.
    config = load_run_config(None, [f"train.init_from_hf={release}"])
    assert (config.model.param_dtype, config.model.dtype) == ("float32", "bfloat16")
    assert export_dtype(config) == "bfloat16"
    assert load_run_config(None, [f"train.init_from_hf={release}",
                                  "model.dtype=float32"]).model.dtype == "float32"

    out = tmp_path / "export"
    model = load_hf_checkpoint(release)
    save_hf_checkpoint(model, out, dtype=export_dtype(config))
    origin = tokenizer_origin(str(release), None)
    write_tokenizer_files(out, load_tokenizer(release / "tokenizer.json"), origin, 1024)
    write_generation_config(out, model.config, end_of_text_id=0, origin=origin)

    published = AutoModelForCausalLM.from_pretrained(out).eval()
    assert published.dtype == torch.bfloat16
    originals = dict(original.named_parameters())
    for name, tensor in published.named_parameters():
        assert torch.equal(tensor, originals[name]), name  # fp32 master weights hold bf16 exactly
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == chat["chat_template"]  # the release's files, copied
    ids = tokenizer("w5 w7 w9 w11", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[7, 9, 11, 13]]
    for reference in (original, published):
        reference.set_experts_implementation("eager")
    expected = original.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(published.generate(ids, max_new_tokens=6, do_sample=False), expected)


def test_our_own_tokenizer_gets_its_config_and_a_generation_config(tmp_path):
    word_tokenizer(tmp_path / "tokenizer.json", 50)
    config = ModelConfig(eos_token_id=None, bos_token_id=None)  # a replica's: no ids of its own
    out = tmp_path / "export"
    out.mkdir()
    write_tokenizer_files(out, load_tokenizer(tmp_path / "tokenizer.json"), None, 4096)
    write_generation_config(out, config, end_of_text_id=0, origin=None)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0
    assert tokenizer.model_max_length == 4096
    generation = GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == 0 and generation.pad_token_id == 0
    assert generation.do_sample is False
