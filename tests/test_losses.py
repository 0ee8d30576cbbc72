"""Loss terms against NumPy: cross-entropy over valid tokens, MTP targets and masks at depths
1 and 2 on packed rows, the MTP loss, the router z-loss, and the LBL's scale."""

import jax.numpy as jnp
import numpy as np
import pytest

from qnext_jax.data.batch import batch_from_packed_rows, positions_from_segments
from qnext_jax.model.moe import RouterStats, route, router_stats
from qnext_jax.model.transformer import ModelOutput
from qnext_jax.train.losses import (
    LossConfig, load_balancing_loss, loss_terms, mtp_targets, normalizers, token_cross_entropy,
)


def numpy_ce(logits, targets):
    logits = np.asarray(logits, np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


@pytest.fixture
def packed():
    # One row: document 1 = tokens 10..14, document 2 = 20..23, then two padding tokens.
    tokens = np.array([[10, 11, 12, 13, 14, 20, 21, 22, 23, 0, 0]])
    segments = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0]])
    return batch_from_packed_rows(tokens, segments)


def test_packed_rows_mask_document_boundaries_and_padding(packed):
    np.testing.assert_array_equal(packed.targets[0], [11, 12, 13, 14, 20, 21, 22, 23, 0, 0])
    np.testing.assert_array_equal(packed.loss_mask[0], [1, 1, 1, 1, 0, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(packed.positions[0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(positions_from_segments(np.array([[3, 3, 0, 5]])), [[0, 1, 0, 0]])


def test_mtp_targets_shift_by_depth_plus_one_within_documents(packed):
    targets, mask = mtp_targets(packed, 1)  # position i predicts token i+2
    np.testing.assert_array_equal(targets[0], [12, 13, 14, 20, 21, 22, 23, 0, 0, 0])
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 0, 0, 1, 1, 0, 0, 0])
    targets, mask = mtp_targets(packed, 2)  # position i predicts token i+3
    np.testing.assert_array_equal(targets[0], [13, 14, 20, 21, 22, 23, 0, 0, 0, 0])
    np.testing.assert_array_equal(mask[0], [1, 1, 0, 0, 0, 1, 0, 0, 0, 0])


def test_loss_terms_match_numpy(packed):
    rng = np.random.default_rng(0)
    shape = packed.input_ids.shape + (32,)
    logits = [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3)]
    router_logits = jnp.asarray(rng.normal(size=(2, 10, 6)), jnp.float32)  # 2 layers, 10 tokens
    stats = [router_stats(l, *route(l, 2, True)[::2], 6, packed.valid) for l in router_logits]
    stats = RouterStats(*(jnp.stack(parts) for parts in zip(*stats)))
    output = ModelOutput(logits[0], None, stats, (logits[1], logits[2]), None)
    config = LossConfig(mtp_weight=0.3, z_loss_weight=0.01)
    terms = loss_terms(output, packed, normalizers(packed, 2), config, lbl_coef=0.001)

    mask = np.asarray(packed.loss_mask)
    ce = (numpy_ce(logits[0], np.asarray(packed.targets)) * mask).sum() / mask.sum()
    mtp = []
    for depth in (1, 2):
        targets, depth_mask = (np.asarray(a) for a in mtp_targets(packed, depth))
        mtp.append((numpy_ce(logits[depth], targets) * depth_mask).sum() / depth_mask.sum())
    valid = np.asarray(packed.valid)[0]
    lse = np.log(np.exp(np.asarray(router_logits, np.float64)).sum(-1))  # [2, 10]
    z_loss = (lse[:, valid] ** 2).mean()
    assert float(terms["ce_loss"]) == pytest.approx(ce, rel=1e-6)
    assert float(terms["mtp_loss"]) == pytest.approx(np.mean(mtp), rel=1e-6)
    assert float(terms["z_loss"]) == pytest.approx(z_loss, rel=1e-6)
    total = ce + 0.3 * np.mean(mtp) + 0.001 * float(terms["lbl_loss"]) + 0.01 * z_loss
    assert float(terms["loss"]) == pytest.approx(total, rel=1e-6)
    np.testing.assert_allclose(token_cross_entropy(logits[0], packed.targets),
                               numpy_ce(logits[0], np.asarray(packed.targets)), rtol=1e-5)


def test_lbl_is_k_for_uniform_routing_and_larger_when_collapsed():
    tokens, experts, k = 12, 4, 2
    counts = jnp.full((1, experts), tokens * k / experts)
    stats = RouterStats(counts, jnp.full((1, experts), tokens / experts), jnp.zeros(1), jnp.full(1, tokens))
    assert float(load_balancing_loss(stats, counts / tokens, tokens)) == pytest.approx(k)
    collapsed = jnp.array([[tokens, tokens, 0, 0]], jnp.float32)
    probs = jnp.array([[tokens / 2, tokens / 2, 0, 0]], jnp.float32)
    stats = stats._replace(expert_counts=collapsed, prob_sums=probs)
    assert float(load_balancing_loss(stats, collapsed / tokens, tokens)) == pytest.approx(2 * k)


def test_loss_config_errors():
    from qnext_jax.config import ConfigError
    with pytest.raises(ConfigError, match=r"unknown key loss.mtp_wieght \(did you mean 'mtp_weight'\?\)"):
        LossConfig.from_dict({"mtp_wieght": 0.3})
    with pytest.raises(ConfigError, match="loss.lbl_formula must be one of"):
        LossConfig(lbl_formula="per_device")
