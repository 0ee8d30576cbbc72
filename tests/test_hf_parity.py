"""The whole model against transformers' Qwen3NextForCausalLM (CPU, fp32), through the
converter in both directions."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from hf_reference import SHAPES, hf_logits, random_hf_model
from numerics import relative_error
from qnext_jax.convert import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from qnext_jax.train.losses import hf_pooled_load_balancing_loss

torch = pytest.importorskip("torch")  # the reference; absent on Python 3.12 (.ci/run)

SEQ_LEN = 80  # > 64: the chunked delta rule crosses a chunk boundary


@pytest.fixture(scope="module", params=sorted(SHAPES))
def hf_checkpoint(request, tmp_path_factory):
    model = random_hf_model(request.param, seed=3)
    directory = tmp_path_factory.mktemp(f"hf_{request.param}")
    model.save_pretrained(directory)
    input_ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, SEQ_LEN))
    return model, directory, input_ids, hf_logits(model, input_ids)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_logits_match_transformers(hf_checkpoint, impl):
    _, directory, input_ids, expected = hf_checkpoint
    model = load_hf_checkpoint(directory, delta_rule_impl=impl)
    assert model.config.mtp_num_hidden_layers == 0  # transformers writes no mtp.* tensors
    logits = jax.jit(lambda ids: model(ids).logits)(jnp.asarray(input_ids))
    assert relative_error(logits, expected) <= 1e-4
    # Far from trivially small: the stressed weights give logits of order one.
    assert np.abs(expected).max() > 0.5


def test_router_statistics_give_transformers_aux_loss(hf_checkpoint):
    """HF's pooled load-balancing loss, recomputed from our per-layer router statistics."""
    hf_model, directory, input_ids, _ = hf_checkpoint
    with torch.no_grad():
        aux = float(hf_model(torch.as_tensor(input_ids)).aux_loss)
    model = load_hf_checkpoint(directory)
    stats = model(jnp.asarray(input_ids)).router_stats
    tokens = stats.num_tokens.sum()
    fraction = stats.expert_counts.sum(0) / tokens  # pooled over layers, not normalised by k
    probability = stats.prob_sums.sum(0) / tokens
    by_hand = float(model.config.num_experts * jnp.sum(fraction * probability))
    assert by_hand == pytest.approx(aux, rel=1e-5)
    ours = float(hf_pooled_load_balancing_loss(stats))
    assert ours == pytest.approx(aux, rel=1e-5)


def test_export_loads_in_transformers_with_same_logits(hf_checkpoint, tmp_path):
    hf_model, directory, input_ids, expected = hf_checkpoint
    model = load_hf_checkpoint(directory)
    save_hf_checkpoint(model, tmp_path / "export", max_shard_bytes=200_000)  # several shards
    assert len(list((tmp_path / "export").glob("*.safetensors"))) > 1
    from transformers import Qwen3NextForCausalLM

    reloaded = Qwen3NextForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    reloaded.set_experts_implementation("eager")
    reloaded.set_attn_implementation("eager")
    assert reloaded.config.layer_types == hf_model.config.layer_types
    np.testing.assert_array_equal(hf_logits(reloaded, input_ids), expected)


def test_round_trip_is_bit_exact(hf_checkpoint, tmp_path):
    _, directory, _, _ = hf_checkpoint
    original = load_file(str(directory / "model.safetensors"))
    model = load_hf_checkpoint(directory)
    save_hf_checkpoint(model, tmp_path / "export")
    exported = {}
    for path in (tmp_path / "export").glob("*.safetensors"):
        exported.update(load_file(str(path)))
    assert set(exported) == set(original)
    for name, array in original.items():
        assert exported[name].dtype == array.dtype, name
        np.testing.assert_array_equal(exported[name], array, err_msg=name)


def test_plain_norms_load_and_export_the_same_function(hf_checkpoint, tmp_path):
    """A plain-norm model (scale w) holds HF's zero-centred weights as 1 + w_hf: transformers'
    logits, and the export writes w - 1 back (to one rounding of the +1 and -1)."""
    _, directory, input_ids, expected = hf_checkpoint
    model = load_hf_checkpoint(directory, norm_style="plain")
    original = load_file(str(directory / "model.safetensors"))
    stored = np.asarray(model.blocks.layers[0].input_layernorm.weight[...][0])
    np.testing.assert_allclose(stored, 1 + original["model.layers.0.input_layernorm.weight"], rtol=1e-7)
    logits = jax.jit(lambda ids: model(ids).logits)(jnp.asarray(input_ids))
    assert relative_error(logits, expected) <= 1e-4
    save_hf_checkpoint(model, tmp_path / "export")
    exported = load_file(str(next((tmp_path / "export").glob("*.safetensors"))))
    for name in ("model.norm.weight", "model.layers.3.self_attn.q_norm.weight"):
        np.testing.assert_allclose(exported[name], original[name], atol=2e-7, err_msg=name)


def test_mtp_weights_round_trip(tmp_path):
    """A checkpoint with mtp.* tensors (as the released one) loads them into the MTP module
    and writes them back unchanged."""
    from qnext_jax.config import ModelConfig
    from qnext_jax.model import Qwen3NextModel

    config = ModelConfig.from_yaml("configs/tiny.yaml").replace(mtp_num_hidden_layers=2, mtp_depth=2)
    model = Qwen3NextModel(config, rngs=nnx.Rngs(0))
    save_hf_checkpoint(model, tmp_path / "a")
    loaded = load_hf_checkpoint(tmp_path / "a", mtp_depth=2)
    assert loaded.config.mtp_num_hidden_layers == 2
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, 20)))
    mtp_logits = nnx.jit(lambda m, x: m(x).mtp_logits)  # one compilation serves both models
    out_a, out_b = mtp_logits(model, ids), mtp_logits(loaded, ids)
    assert len(out_b) == 2
    for a, b in zip(out_a, out_b):
        np.testing.assert_array_equal(a, b)
    save_hf_checkpoint(loaded, tmp_path / "b")
    first = load_file(str(next((tmp_path / "a").glob("*.safetensors"))))
    second = load_file(str(next((tmp_path / "b").glob("*.safetensors"))))
    assert any(name.startswith("mtp.layers.1.mlp.experts.") for name in first)
    assert set(first) == set(second)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_fused_expert_layout_loads_the_same(hf_checkpoint, tmp_path):
    """transformers>=5's in-memory fused experts, stored fused on disk, load identically."""
    hf_model, directory, input_ids, expected = hf_checkpoint
    tensors = load_file(str(directory / "model.safetensors"))
    config = hf_model.config
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp.experts."
        if f"{prefix}0.gate_proj.weight" not in tensors:
            continue
        per_expert = lambda proj: [tensors.pop(f"{prefix}{e}.{proj}.weight") for e in range(config.num_experts)]
        gate, up, down = per_expert("gate_proj"), per_expert("up_proj"), per_expert("down_proj")
        tensors[f"{prefix}gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])
        tensors[f"{prefix}down_proj"] = np.stack(down)
    (tmp_path / "fused").mkdir()
    save_file(tensors, str(tmp_path / "fused" / "model.safetensors"))
    (tmp_path / "fused" / "config.json").write_text((directory / "config.json").read_text())
    model = load_hf_checkpoint(tmp_path / "fused")
    assert relative_error(model(jnp.asarray(input_ids)).logits, expected) <= 1e-4


def _copy_with(directory, target, edit):
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    target.mkdir()
    save_file(tensors, str(target / "model.safetensors"))
    (target / "config.json").write_text((directory / "config.json").read_text())
    return target


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    _, directory, _, _ = hf_checkpoint
    name = "model.layers.2.linear_attn.in_proj_ba.weight"
    broken = _copy_with(directory, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*in_proj_ba"):
        load_hf_checkpoint(broken)


def test_wrong_shape_is_named_with_both_shapes(hf_checkpoint, tmp_path):
    _, directory, _, _ = hf_checkpoint
    name = "model.layers.3.self_attn.k_proj.weight"

    def edit(tensors):
        tensors[name] = tensors[name][:-1]

    broken = _copy_with(directory, tmp_path / "shape", edit)
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \[\d+, \d+\]; the config expects"):
        load_hf_checkpoint(broken)


def test_unexpected_tensor_and_missing_directory(hf_checkpoint, tmp_path):
    _, directory, _, _ = hf_checkpoint
    broken = _copy_with(directory, tmp_path / "extra",
                        lambda t: t.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="does not describe.*extra.weight"):
        load_hf_checkpoint(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nowhere")


def test_bfloat16_checkpoint_dtypes_come_from_headers(hf_checkpoint, tmp_path):
    """A bf16 checkpoint (as released) loads into fp32 parameters computing in bf16 (the
    checkpoint's dtype) or, on request, fp32; into bf16 parameters on request, A_log and
    dt_bias kept fp32."""
    hf_model, directory, input_ids, _ = hf_checkpoint
    copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    from transformers import Qwen3NextForCausalLM

    # The bf16-rounded weights run in fp32 by transformers (a fresh load: a model cast to bf16
    # and back would also carry bf16-rounded rotary frequencies).
    rounded = Qwen3NextForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    rounded.set_experts_implementation("eager")
    rounded.set_attn_implementation("eager")
    expected = hf_logits(rounded, input_ids)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    assert load_hf_checkpoint(tmp_path / "bf16").config.dtype == "bfloat16"  # the file's dtype
    model = load_hf_checkpoint(tmp_path / "bf16", compute_dtype="float32")
    assert model.embed[...].dtype == jnp.float32
    assert relative_error(model(jnp.asarray(input_ids)).logits, expected) <= 1e-4
    model16 = load_hf_checkpoint(tmp_path / "bf16", dtype=jnp.bfloat16, compute_dtype="bfloat16")
    assert model16.embed[...].dtype == jnp.bfloat16 and model16.config.dtype == "bfloat16"
    assert model16(jnp.asarray(input_ids)).hidden.dtype == jnp.bfloat16
    state = nnx.state(model16, nnx.Param)
    a_log = [v for p, v in nnx.to_flat_state(state) if p[-1] == "A_log"]
    assert a_log and all(v.value.dtype == jnp.float32 for v in a_log)


def test_command_line_check_and_reshard(hf_checkpoint, tmp_path, capsys):
    from qnext_jax.convert.__main__ import main

    _, directory, _, _ = hf_checkpoint
    assert main(["check", str(directory)]) == 0
    assert "tensors (F32) match the config" in capsys.readouterr().out
    assert main(["reshard", str(directory), str(tmp_path / "out")]) == 0
    assert main(["check", str(tmp_path / "out")]) == 0
    # Read onto a mesh, tensor by tensor into the shards: the same files' contents.
    assert main(["reshard", str(directory), str(tmp_path / "sharded"), "--mesh", "expert=2",
                 "--mesh", "data=4"]) == 0
    from safetensors.numpy import load_file
    one, sharded = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
                    for d in (tmp_path / "out", tmp_path / "sharded"))
    assert one.keys() == sharded.keys()
    for name in one:
        np.testing.assert_array_equal(one[name], sharded[name], err_msg=name)
    assert main(["reshard", str(directory), str(tmp_path / "x"), "--mesh", "pipeline=2"]) == 2
    assert "expected AXIS=SIZE" in capsys.readouterr().err
    assert main(["reshard", str(directory), str(tmp_path / "x"), "--mesh", "tensor=2",
                 "--mesh", "data=4"]) == 2
    assert "is not divisible by mesh.tensor = 2" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
