"""The design switches of the small-replica studies, each checked on the computation it
changes: plain norms are x_hat * w, the attention without its output gate is the gated one's
output before the gate, the plain router init is the normalised draw before its rescale, the
layer-pattern presets, norm-weight decay, the norm-scale metric and the HF conversion of each.
(The balancing-loss scopes are in test_losses.py; the defaults' bit-identity is the HF parity.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qnext_jax.config import ConfigError, ModelConfig
from qnext_jax.convert import save_hf_checkpoint
from qnext_jax.model import Qwen3NextModel
from qnext_jax.model.attention import GatedAttention
from qnext_jax.model.moe import SparseMoE
from qnext_jax.model.norms import RMSNorm, largest_norm_scale
from qnext_jax.model.rope import rotary_tables
from qnext_jax.train.optimizer import OptimizerConfig, make_optimizer, weight_decay_mask

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2,
            linear_key_head_dim=8, linear_value_head_dim=8, num_experts=6, num_experts_per_tok=2,
            moe_intermediate_size=16, shared_expert_intermediate_size=16, max_position_embeddings=256,
            mtp_num_hidden_layers=1)


def flat(tree):
    return {"/".join(map(str, path)): leaf[...] for path, leaf in nnx.to_flat_state(tree)}


def is_rms_norm(name: str) -> bool:
    """Every `*norm*/weight` of the flat state but the DeltaNet's gated output norm."""
    parts = name.split("/")
    return (len(parts) > 1 and "norm" in parts[-2] and parts[-1] == "weight"
            and not name.endswith("mixer/norm/weight"))


def test_plain_rmsnorm_is_x_hat_times_w_initialised_to_one():
    config = ModelConfig(**TINY, norm_style="plain")
    norm = RMSNorm(32, config)
    np.testing.assert_array_equal(np.asarray(norm.weight[...]), 1.0)
    rng = np.random.default_rng(0)
    weight = rng.normal(size=32).astype(np.float32)
    norm.weight[...] = jnp.asarray(weight)
    x = (rng.normal(size=(3, 5, 32)) * 7).astype(np.float32)
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * weight
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=2e-6, atol=1e-6)


def test_attention_without_output_gate_is_the_gated_output_before_its_gate():
    """With a zero gate projection the gate is sigmoid(0) = 1/2 on every element, so the gated
    layer's output is half the plain layer's when every other weight is the same."""
    config = ModelConfig(**TINY)
    gated = GatedAttention(config, rngs=nnx.Rngs(1))
    plain = GatedAttention(config.replace(attention_output_gate=False), rngs=nnx.Rngs(1))
    assert not hasattr(plain, "gate_proj")
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(plain, name)[...] = getattr(gated, name)[...]
    gated.gate_proj[...] = jnp.zeros_like(gated.gate_proj[...])
    x = jax.random.normal(jax.random.key(2), (2, 12, 32))
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    rotary = rotary_tables(positions, config, jnp.float32)
    segments = jnp.asarray([[1] * 7 + [2] * 5, [1] * 12])
    plain_out = plain(x, rotary=rotary, segment_ids=segments)
    gated_out = gated(x, rotary=rotary, segment_ids=segments)
    np.testing.assert_allclose(np.asarray(gated_out) * 2, np.asarray(plain_out), rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(plain_out).max()) > 1e-3


@pytest.mark.parametrize("changes", [dict(attention_output_gate=False), dict(norm_style="plain"),
                                     dict(layer_types=("full_attention",) * 4)])
def test_parameter_counts_follow_the_switches(changes):
    config = ModelConfig(**TINY, **changes)
    abstract = nnx.eval_shape(lambda: Qwen3NextModel(config, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(int(np.prod(x.shape)) for x in leaves) == config.param_counts()["total"]


def test_plain_router_init_is_the_same_draw_without_equal_norms():
    normalised = SparseMoE(ModelConfig(**TINY), rngs=nnx.Rngs(3)).router[...]
    plain = SparseMoE(ModelConfig(**TINY, router_init="plain"), rngs=nnx.Rngs(3)).router[...]
    plain_norms = np.linalg.norm(np.asarray(plain, np.float64), axis=0)
    normalised_norms = np.linalg.norm(np.asarray(normalised, np.float64), axis=0)
    np.testing.assert_allclose(normalised_norms, 0.02 * np.sqrt(32), rtol=1e-5)
    assert plain_norms.std() / plain_norms.mean() > 0.03  # the draw's own spread of norms
    # Column by column, one is a positive multiple of the other: the same directions.
    np.testing.assert_allclose(np.asarray(plain) * (normalised_norms / plain_norms),
                               np.asarray(normalised), rtol=1e-5, atol=1e-8)


def test_norm_weights_undecayed_when_switched_off():
    config = ModelConfig(**TINY)
    abstract = nnx.eval_shape(lambda: Qwen3NextModel(config, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, jnp.float32), nnx.state(abstract, nnx.Param))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_steps=0,
                                               weight_decay=0.5, clip_norm=None,
                                               decay_norm_weights=False))
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    new = flat(optax.apply_updates(params, updates))
    for name in ("blocks/layers/0/input_layernorm/weight", "blocks/layers/3/mixer/q_norm/weight",
                 "final_norm/weight", "mtp/pre_fc_norm_hidden/weight", "mtp/norm/weight",
                 "blocks/layers/0/mixer/norm/weight"):
        np.testing.assert_array_equal(np.asarray(new[name]), 0.5, err_msg=name)
    np.testing.assert_allclose(np.asarray(new["blocks/layers/0/mixer/q_proj"]), 0.5 * 0.95, rtol=1e-6)
    # The default decays the same norms: only A_log, dt_bias and the gated norm are spared.
    default_mask = jax.tree.leaves(weight_decay_mask(params))
    off_mask = jax.tree.leaves(weight_decay_mask(params, decay_norm_weights=False))
    norms = sum(map(is_rms_norm, new))
    assert default_mask.count(False) + norms == off_mask.count(False)


@pytest.mark.parametrize("norm_style", ["zero_centred", "plain"])
def test_largest_norm_scale_reads_every_rms_norm_weight(norm_style):
    config = ModelConfig(**TINY, norm_style=norm_style)
    params = nnx.state(Qwen3NextModel(config, rngs=nnx.Rngs(0)), nnx.Param)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    scales = [np.abs(w + 1 if norm_style == "zero_centred" else w).max()
              for name, w in flat(params).items()
              if is_rms_norm(name)]
    # 2 per trunk layer, the final norm, the MTP's 3 and its layer's 2, q/k of 2 attentions
    assert len(scales) == 2 * 4 + 1 + 3 + 2 + 2 * 2
    assert float(largest_norm_scale(params, norm_style)) == pytest.approx(max(scales), rel=1e-6)


def test_layer_pattern_presets(repo_root, tmp_path):
    small = ModelConfig.from_yaml(repo_root / "configs" / "small.yaml")
    attention = ModelConfig.from_yaml(repo_root / "configs" / "small_all_attention.yaml")
    deltanet = ModelConfig.from_yaml(repo_root / "configs" / "small_all_deltanet.yaml")
    assert set(attention.mixer_types) == {"full_attention"}
    assert set(deltanet.mixer_types) == {"linear_attention"}
    for preset in (attention, deltanet):  # everything else is the default replica's
        assert dataclasses.replace(preset, layer_types=None) == small
    loop = tmp_path / "loop.yaml"
    loop.write_text("model:\n  preset: loop.yaml\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        ModelConfig.from_yaml(loop)


def test_switch_values_are_checked():
    with pytest.raises(ConfigError, match="norm_style is 'centered'"):
        ModelConfig(**TINY, norm_style="centered")
    with pytest.raises(ConfigError, match="router_init is 'uniform'"):
        ModelConfig(**TINY, router_init="uniform")
    with pytest.raises(ConfigError, match="attention_output_gate must be true or false"):
        ModelConfig(**TINY, attention_output_gate="no")
    with pytest.raises(ConfigError, match="optimizer.decay_norm_weights must be true or false"):
        OptimizerConfig(decay_norm_weights="flase")


def test_plain_norm_conversion_keeps_a_bf16_checkpoints_weights_exact():
    """HF's zero-centred w_hf (bf16, near 0) becomes 1 + w_hf in fp32, not 1 + w_hf rounded to
    bf16 steps of 2^-7 near 1; and back to w_hf exactly."""
    from qnext_jax.convert.layout import checkpoint_rules

    rules = checkpoint_rules(ModelConfig(**TINY, norm_style="plain"))
    rule = next(r for r in rules if r.hf_name == "model.norm.weight")
    w_hf = (np.random.default_rng(0).normal(size=TINY["hidden_size"]) * 1e-3).astype(jnp.bfloat16)
    (ours,) = rule.to_ours(w_hf)
    expected = 1.0 + np.asarray(w_hf, np.float64)
    np.testing.assert_allclose(np.asarray(ours, np.float64), expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(rule.to_hf([ours]), np.float32).astype(jnp.bfloat16), w_hf)


def test_a_model_without_output_gate_cannot_be_exported(tmp_path):
    config = ModelConfig(**TINY, attention_output_gate=False)
    model = Qwen3NextModel(config, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="attention_output_gate=False has no Hugging Face"):
        save_hf_checkpoint(model, tmp_path / "hf")


def test_probe_runs_the_trained_model_and_measures_first_token_attention():
    """The probe's layer-by-layer forward ends where the model's own does; its attention mass
    on each document's first token matches a float64 NumPy softmax."""
    from qnext_jax.data.batch import batch_from_packed_rows
    from qnext_jax.experiments.probes import (first_token_attention, probe,
                                              uniform_first_token_share)

    config = ModelConfig(**TINY)
    model = Qwen3NextModel(config, rngs=nnx.Rngs(5))
    rng = np.random.default_rng(2)
    segments = np.ones((2, 17), np.int32)
    segments[0, 7:] = 2
    segments[1, 14:] = 0  # padding
    batch = batch_from_packed_rows(rng.integers(1, 64, (2, 17)), segments)
    out = probe(model, batch)
    expected = model(batch.input_ids, positions=batch.positions, segment_ids=batch.segment_ids,
                     valid=batch.valid, mtp=False).hidden
    np.testing.assert_allclose(np.asarray(out["hidden"]), np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert out["first_token_attention"].shape == (1,) and out["max_activation"].shape == (5,)

    query = rng.normal(size=(2, 16, 2, 8)).astype(np.float32)
    key = rng.normal(size=(2, 16, 1, 8)).astype(np.float32)
    documents = np.array([[0] * 6 + [1] * 10, [0] * 16])
    valid = np.ones((2, 16), bool)
    valid[1, 12:] = False
    masses, even = [], []
    for b in range(2):
        for n in range(2):
            for t in range(16):
                start = int(np.flatnonzero(documents[b] == documents[b, t])[0])
                if t == start or not valid[b, t]:
                    continue
                logits = query[b, t, n].astype(np.float64) @ key[b, start:t + 1, 0].T.astype(np.float64) * 0.5
                weights = np.exp(logits - logits.max())
                masses.append(weights[0] / weights.sum())
                even.append(1 / (t - start + 1))
    ours = first_token_attention(jnp.asarray(query), jnp.asarray(key), jnp.asarray(documents),
                                 jnp.asarray(valid), 0.5)
    assert float(ours) == pytest.approx(np.mean(masses), rel=1e-5)
    uniform = uniform_first_token_share(jnp.asarray(documents), jnp.asarray(valid))
    assert float(uniform) == pytest.approx(np.mean(even), rel=1e-6)
