"""AdamW decay mask (zero-centred norms decay toward 0; A_log, dt_bias, the gated-norm weight
do not), the learning-rate schedules, clipping, and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import REPO_ROOT
from qnext_jax.config import ConfigError, ModelConfig
from qnext_jax.model import Qwen3NextModel
from qnext_jax.train.optimizer import (
    OptimizerConfig,
    learning_rate_schedule,
    make_optimizer,
    weight_decay_mask,
)


def flat(tree):
    return {"/".join(map(str, path)): leaf for path, leaf in nnx.to_flat_state(tree)}


@pytest.fixture(scope="module")
def params():
    config = ModelConfig.from_yaml(REPO_ROOT / "configs" / "tiny.yaml")
    model = nnx.eval_shape(lambda: Qwen3NextModel(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    # Every parameter 0.5, so decay is visible on each of them.
    return jax.tree.map(lambda x: jnp.full(x.shape, 0.5, jnp.float32), state)


def test_norm_weights_decay_but_deltanet_rates_and_gated_norm_do_not(params):
    config = OptimizerConfig(learning_rate=0.1, schedule="constant", warmup_steps=0,
                             weight_decay=0.5, clip_norm=None)
    optimizer = make_optimizer(config)
    state = optimizer.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zeros, state, params)
    new = flat(optax.apply_updates(params, updates))
    decayed = 0.5 * (1 - 0.1 * 0.5)
    expect = {
        "blocks/layers/0/input_layernorm/weight": decayed,  # zero-centred: toward scale 1
        "blocks/layers/3/mixer/q_norm/weight": decayed,
        "final_norm/weight": decayed,
        "embed": decayed,
        "blocks/layers/0/mixer/q_proj": decayed,
        "blocks/layers/0/mixer/A_log": 0.5,
        "blocks/layers/0/mixer/dt_bias": 0.5,
        "blocks/layers/0/mixer/norm/weight": 0.5,  # gated norm: plain scale, init 1
    }
    for name, value in expect.items():
        np.testing.assert_allclose(np.asarray(new[name][...]), value, rtol=1e-6, err_msg=name)
    mask = jax.tree.leaves(weight_decay_mask(params))
    assert mask.count(False) == 3 * 3  # A_log, dt_bias, gated norm; 3 stacked DeltaNet slots


def test_schedules():
    cosine = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10,
                                                    total_steps=110, final_lr_fraction=0.1))
    np.testing.assert_allclose([cosine(0), cosine(5), cosine(10), cosine(60), cosine(110)],
                               [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    wsd = learning_rate_schedule(OptimizerConfig(
        learning_rate=1.0, schedule="warmup_stable_decay", warmup_steps=10, total_steps=110,
        decay_fraction=0.2, final_lr_fraction=0.0))
    # 0.2 * 110 = 22 decay steps: stable from 10 to 88, linear to 0 at 110.
    np.testing.assert_allclose([wsd(5), wsd(10), wsd(87), wsd(88), wsd(99), wsd(110)],
                               [0.5, 1.0, 1.0, 1.0, 0.5, 0.0], atol=1e-6)


def test_global_norm_clipping():
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1.0, schedule="constant",
                                               warmup_steps=0, weight_decay=0.0, clip_norm=1.0))
    params = {"w": jnp.zeros(4)}
    _, state = optimizer.update({"w": jnp.full(4, 10.0)}, optimizer.init(params), params)
    first_moment = optax.tree_utils.tree_get(state, "mu")["w"]  # (1 - b1) * clipped gradient
    np.testing.assert_allclose(jnp.linalg.norm(first_moment), 1 - 0.9, rtol=1e-6)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"unknown key optimizer.learning_rte \(did you mean 'learning_rate'\?\)"):
        OptimizerConfig.from_dict({"learning_rte": 1.0})
    with pytest.raises(ConfigError, match="schedule"):
        OptimizerConfig(schedule="linear")
    with pytest.raises(ConfigError, match="warmup_steps"):
        OptimizerConfig(warmup_steps=20, total_steps=10)
