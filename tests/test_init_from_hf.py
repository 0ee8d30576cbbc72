"""Continued pretraining: `train.init_from_hf` starts from a Hugging Face directory, each
tensor built on its own devices' shards; the step-0 loss is the loss `transformers` computes
on the same batch; the final model exports back to Hugging Face format."""

import io
import random

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

import qnext_jax.train.loop as loop
from hf_reference import random_hf_model
from qnext_jax.convert import load_hf_checkpoint
from qnext_jax.convert.load import load_hf_state
from qnext_jax.convert.safetensors_dir import SafetensorsDir
from qnext_jax.parallel.axes import ShardingRules
from qnext_jax.parallel.mesh import MeshConfig, make_mesh
from qnext_jax.train.run_config import load_run_config
from qnext_jax.model import abstract_model

torch = pytest.importorskip("torch")  # the reference; absent on Python 3.12 (.ci/run)

SEQ_LEN = 32
MESH = ["mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    """A tiny random transformers model with a word-level tokenizer.json beside it (vocab 96:
    the vocabulary is split over mesh.tensor)."""
    hf_model = random_hf_model("gqa", seed=5, vocab_size=96)
    directory = tmp_path_factory.mktemp("hf_model")
    hf_model.save_pretrained(directory)
    words = [f"w{i}" for i in range(hf_model.config.vocab_size - 2)]
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    return hf_model, directory, words


@pytest.fixture(scope="module")
def corpus(hf_directory, tmp_path_factory):
    """Documents of exactly SEQ_LEN words: with the end-of-text token each fills one packed row,
    so every row is a single document and transformers sees exactly what we train on."""
    _, _, words = hf_directory
    directory = tmp_path_factory.mktemp("words")
    rng = random.Random(1)
    for i in range(60):
        (directory / f"doc{i:02d}.txt").write_text(" ".join(rng.choices(words, k=SEQ_LEN)))
    return directory


def test_step_zero_loss_equals_transformers_and_export_round_trips(hf_directory, corpus,
                                                                   tmp_path, monkeypatch):
    hf_model, directory, _ = hf_directory
    seen = []
    place = loop.global_batch

    def capture(local, sharding, rows):
        batch = place(local, sharding, rows)
        seen.append(jax.tree.map(np.asarray, batch))
        return batch

    monkeypatch.setattr(loop, "global_batch", capture)
    run_dir = tmp_path / "run"
    config = load_run_config(None, [
        f"train.init_from_hf={directory}", "data.source=text", f"data.paths=[{corpus}/doc*.txt]",
        "data.eval_percent=10", "train.steps=1", "train.batch_size=4", f"train.seq_len={SEQ_LEN}",
        "train.eval_batches=1", "train.export_hf=true", "loss.lbl_formula=hf_pooled",
        f"train.run_dir={run_dir}", *MESH,
    ])
    assert config.model.hidden_size == 64 and config.model.mtp_num_hidden_layers == 0
    assert config.data.tokenizer == str(directory / "tokenizer.json")  # picked up from the dir
    last, state = loop.train(config, run_dir, stream=io.StringIO())

    batch = seen[0]
    assert (batch.segment_ids == 1).all() and batch.loss_mask.all()
    with torch.no_grad():
        targets = torch.tensor(np.array(batch.targets), dtype=torch.long)
        hf = hf_model(input_ids=torch.tensor(np.array(batch.input_ids), dtype=torch.long),
                      labels=targets, shift_labels=targets, output_router_logits=True)
    # Step 1's metrics are computed with the parameters before its update: step 0's loss.
    assert last["step"] == 1
    assert last["loss"] == pytest.approx(float(hf.loss), rel=1e-4)
    assert last["lbl_loss"] == pytest.approx(float(hf.aux_loss), rel=1e-4)
    assert float(hf.loss) > 4.0  # a real loss (stressed random weights), not a degenerate one

    exported = load_hf_checkpoint(run_dir / "hf")
    for (path, ours), (_, theirs) in zip(nnx.to_flat_state(state.params),
                                         nnx.to_flat_state(nnx.state(exported, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(ours.get_value()),
                                      np.asarray(theirs.get_value()), err_msg=str(path))
    # The folder is a model transformers loads, tokenizes for and generates with.
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    published = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    assert published.dtype == torch.float32  # it trained in fp32 (the checkpoint's dtype)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "hf")
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer("w3 w4")["input_ids"] == [5, 6]
    generation = GenerationConfig.from_pretrained(run_dir / "hf")
    assert generation.eos_token_id is not None
    prompt = torch.tensor([[5, 6, 7]])
    assert published.generate(prompt, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_hf_tensors_are_built_on_their_shardings(hf_directory):
    _, directory, _ = hf_directory
    config = load_run_config(None, [f"train.init_from_hf={directory}"]).model
    assert config.remat_policy == "full"  # a released checkpoint's default
    assert load_run_config(None, [f"train.init_from_hf={directory}",
                                  "model.remat_policy=none"]).model.remat_policy == "none"
    rules = ShardingRules(config, make_mesh(MeshConfig(fsdp=2, expert=2, tensor=2)))
    _, abstract_params = nnx.split(abstract_model(config), nnx.Param)
    shardings = dict(nnx.to_flat_state(rules.param_shardings(abstract_params)))
    params = load_hf_state(SafetensorsDir(directory), config, abstract_params, shardings.get)
    reference = nnx.state(load_hf_checkpoint(directory), nnx.Param)
    expert_sharded = 0
    for (path, leaf), (_, expected) in zip(nnx.to_flat_state(params), nnx.to_flat_state(reference)):
        array = leaf.get_value()
        assert array.sharding == shardings[path], path
        np.testing.assert_array_equal(np.asarray(array), np.asarray(expected.get_value()))
        spec = tuple(array.sharding.spec)
        if "expert" in spec:  # the experts' own axis (other weights split their width over it)
            expert_sharded += 1
            # Each device holds only its half of the experts.
            axis = spec.index("expert")
            assert array.addressable_shards[0].data.shape[axis] == array.shape[axis] // 2
    assert expert_sharded >= 3  # gate, up and down expert stacks
