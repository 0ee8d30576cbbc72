"""`python -m qnext_jax.generate` on a run directory (parameters read from its checkpoint,
optimizer state left on disk) and on a Hugging Face directory; `python -m qnext_jax.convert
export` of a run's checkpoint; bad input exits with 2. Paths are given as users type them:
relative to the working directory."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from generation_models import tiny_config
from qnext_jax.convert import save_hf_checkpoint
from qnext_jax.data.tokenizer import train_byte_level_bpe
from qnext_jax.generate import Generator
from qnext_jax.generate.__main__ import main
from qnext_jax.generate.sources import load_for_generation
from qnext_jax.model.transformer import Qwen3NextModel
from qnext_jax.train.checkpoint import Checkpoints
from qnext_jax.train.step import TrainState

TEXTS = ["def value(self): return self.x + 1\n" * 3, "import x\nx = 1\n" * 4]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    config = tiny_config(vocab_size=300, num_hidden_layers=4)
    return Qwen3NextModel(config, rngs=nnx.Rngs(3)), train_byte_level_bpe(TEXTS * 20, 300)


@pytest.fixture(scope="module")
def run_dir(model_and_tokenizer, tmp_path_factory):
    """A run directory as train.py leaves it: config.json, tokenizer.json, checkpoints/."""
    model, tokenizer = model_and_tokenizer
    directory = tmp_path_factory.mktemp("run")
    (directory / "config.json").write_text(json.dumps({"model": model.config.to_dict()}))
    tokenizer.save(directory / "tokenizer.json")
    _, params = nnx.split(model, nnx.Param)
    state = TrainState(jnp.asarray(7, jnp.int32), params, optax.adam(1e-3).init(params))
    checkpoints = Checkpoints(directory / "checkpoints", async_save=False)
    checkpoints.save(7, state, {"position": 0})
    checkpoints.close()
    return directory


def test_run_directory_loads_the_checkpointed_parameters(model_and_tokenizer, run_dir):
    model, _ = model_and_tokenizer
    loaded, tokenizer, source = load_for_generation(run_dir)
    assert "step 7" in source and tokenizer is not None
    for ours, theirs in zip(jax.tree.leaves(nnx.state(loaded, nnx.Param)),
                            jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(ours, theirs)


def test_cli_generates_from_a_run_directory(model_and_tokenizer, run_dir, capsys, monkeypatch):
    model, tokenizer = model_and_tokenizer
    monkeypatch.chdir(run_dir.parent)  # orbax refuses relative paths: they must be resolved
    assert main([run_dir.name, "--prompt", "def value", "--max-new-tokens", "8", "--no-stop",
                 "--speculative", "2", "--mesh", "tensor=2", "--mesh", "expert=4"]) == 0
    out = capsys.readouterr().out
    prompt = tokenizer.tokenizer.encode("def value", add_special_tokens=False).ids
    expected = Generator(model).generate([prompt], max_new_tokens=8).tokens[0]
    # Speculative on an 8-device mesh = plain greedy on one device.
    assert f"def value{tokenizer.decode(expected)}" in out
    assert "tokens/s" in out and "acceptance depth 1:" in out and "depth 2:" in out


def test_cli_generates_from_a_hugging_face_directory(model_and_tokenizer, tmp_path, capsys):
    model, tokenizer = model_and_tokenizer
    save_hf_checkpoint(model, tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import x\n\ndef value\n")
    assert main([str(tmp_path), "--prompt-file", str(prompts), "--max-new-tokens", "4",
                 "--temperature", "0.8", "--top-k", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- 'import x'" in out and "--- 'def value'" in out


CHAT = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_cli_chat_stops_at_generation_configs_end_ids_and_stop_strings(
        model_and_tokenizer, tmp_path, capsys):
    """--chat renders the prompt with tokenizer_config.json's template; the row stops at an id
    listed in generation_config.json (a list, as the Instruct release has), or at --stop."""
    model, tokenizer = model_and_tokenizer
    save_hf_checkpoint(model, tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT}))
    rendered = ("<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\ndef value<|im_end|>\n"
                "<|im_start|>assistant\n")
    prompt = tokenizer.tokenizer.encode(rendered, add_special_tokens=False).ids
    free = Generator(model).generate([prompt], max_new_tokens=12).tokens[0]
    end = next(k for k in range(1, len(free)) if free[k] not in free[:k])
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [model.config.vocab_size - 1, free[end]], "do_sample": False}))
    args = [str(tmp_path), "--chat", "--system", "Be brief", "--prompt", "def value",
            "--max-new-tokens", "12"]
    assert main(args) == 0
    assert f"{rendered}{tokenizer.decode(free[:end + 1])}\n" in capsys.readouterr().out

    (tmp_path / "generation_config.json").unlink()
    text = tokenizer.decode(free)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert main([*args, "--stop", stop, "--stop", "never appears"]) == 0
    assert f"{rendered}{text[: text.find(stop)]}\n" in capsys.readouterr().out


def test_export_cli_writes_a_runs_checkpoint_as_a_hugging_face_directory(
        model_and_tokenizer, run_dir, capsys, monkeypatch):
    from qnext_jax.convert import load_hf_checkpoint
    from qnext_jax.convert.__main__ import main as convert

    model, _ = model_and_tokenizer
    monkeypatch.chdir(run_dir.parent)
    assert convert(["export", run_dir.name, "--out", "exported"]) == 0  # the latest: step 7
    exported = run_dir.parent / "exported"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (exported / name).is_file(), name
    loaded = load_hf_checkpoint(exported)
    for ours, theirs in zip(jax.tree.leaves(nnx.state(loaded, nnx.Param)),
                            jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(ours, theirs)
    assert convert(["export", run_dir.name, "--step", "7", "--dtype", "bfloat16"]) == 0
    assert json.loads((run_dir / "hf-step7" / "config.json").read_text())["dtype"] == "bfloat16"
    assert convert(["export", run_dir.name, "--step", "7"]) == 2  # never over an export
    assert "hf-step7 exists and is not an empty directory" in capsys.readouterr().err
    assert convert(["export", run_dir.name, "--step", "3"]) == 2
    assert "no checkpoint of step 3; it has [7]" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--prompt", "a"], "is not a directory"),
    (["{run}", "--prompt", "a", "--step", "3"], "no checkpoint of step 3; it has [7]"),
    (["{run}", "--prompt", "a", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["{run}", "--prompt-file", "{missing}"], "prompt file"),
    (["{run}", "--prompt", "a", "--mesh", "pipeline=2"], "expected AXIS=SIZE with AXIS one of"),
    (["{run}", "--prompt", "a", "--mesh", "sequence=2"], "decoding keeps sequence at 1"),
    (["{run}", "--prompt", "a", "--mesh", "tensor=16"], "16 devices but 8 are available"),
])
def test_cli_refuses_bad_input(run_dir, tmp_path, capsys, args, message):
    args = [a.format(missing=tmp_path / "nothing", run=run_dir) for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err
