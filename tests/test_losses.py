"""Loss terms against NumPy: cross-entropy over valid tokens, MTP targets and masks at depths
1 and 2 on packed rows, the MTP loss, the router z-loss, and the LBL's scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnext_jax.data.batch import batch_from_packed_rows, positions_from_segments
from qnext_jax.model.moe import RouterStats, route, router_stats
from qnext_jax.model.transformer import ModelOutput
from qnext_jax.train.losses import (
    LossConfig, SeenCounts, expert_fractions, load_balancing_loss, loss_terms, mtp_targets,
    normalizers, running_fractions, scoped_load_balancing_loss, token_cross_entropy,
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
    stats = [router_stats(l, *route(l, 2, True)[::2], 6, packed.valid, 1) for l in router_logits]
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
    stats = RouterStats(counts, jnp.full((1, experts), tokens / experts), jnp.zeros(1), jnp.full(1, tokens),
                        counts[:, None], jnp.full((1, 1, experts), tokens / experts), jnp.full((1, 1), tokens))
    assert float(load_balancing_loss(stats, counts / tokens, tokens)) == pytest.approx(k)
    collapsed = jnp.array([[tokens, tokens, 0, 0]], jnp.float32)
    probs = jnp.array([[tokens / 2, tokens / 2, 0, 0]], jnp.float32)
    stats = stats._replace(expert_counts=collapsed, prob_sums=probs)
    assert float(load_balancing_loss(stats, collapsed / tokens, tokens)) == pytest.approx(2 * k)


def numpy_lbl(probs, valid, k, scope, micro_batch_rows):
    """The peers' statements in float64. probs [layers, B, T, E], valid [B, T] bool.
    global (Qwen): f, P over every valid token of the batch; micro_batch (GShard / Switch, per
    forward pass): f, P per micro-batch, the losses averaged; sequence (DeepSeek-V3):
    f_i = E / (k T_s) * count_i, P_i = mean over the row's tokens, alpha * sum f P per row, averaged
    over rows (times k, our one scale)."""
    layers, _, _, experts = probs.shape
    chosen = np.argsort(-probs, axis=-1)[..., :k]  # [layers, B, T, k]
    selected = (chosen[..., None] == np.arange(experts)).any(-2).astype(np.float64)

    def switch(rows):  # E * sum_i f_i P_i over the valid tokens of `rows`, per layer
        mask = valid[rows]
        f = selected[:, rows][:, mask].mean(1)  # [layers, E], sums to k
        p = probs[:, rows][:, mask].mean(1)
        return experts * (f * p).sum(-1)

    if scope == "global":
        return switch(np.arange(valid.shape[0])).mean()
    if scope == "global_running":  # Megatron's global_aux_loss, micro-batches weighted by tokens
        total, seen_counts, seen_tokens = 0.0, 0.0, 0
        for rows in micro_batch_rows:
            mask = valid[rows]
            seen_counts = seen_counts + selected[:, rows][:, mask].sum(1)  # [layers, E]
            seen_tokens += mask.sum()
            f = seen_counts / max(seen_tokens, 1)
            p = probs[:, rows][:, mask].sum(1) / valid.sum()  # this micro-batch's share of P
            total += (experts * (f * p).sum(-1)).mean()
        return total
    if scope == "micro_batch":  # a micro-batch of padding only has no tokens to balance
        return np.mean([switch(rows).mean() for rows in micro_batch_rows if valid[rows].any()])
    per_row = []
    for row in np.flatnonzero(valid.any(1)):
        mask = valid[row]
        f = experts / (k * mask.sum()) * selected[:, row, mask].sum(1)
        p = probs[:, row, mask].mean(1)
        per_row.append(k * (f * p).sum(-1))  # [layers]
    return np.mean(per_row)


@pytest.mark.parametrize("empty_micro_batch", [False, True])
@pytest.mark.parametrize("scope", ["global", "global_running", "micro_batch", "sequence"])
def test_lbl_scopes_match_numpy_statements_of_the_peers_formulas(scope, empty_micro_batch):
    """Two micro-batches (rows 0, 2 and 1, 3, as the step splits them) of four rows, one row of
    padding only and one partly padded (or the whole second micro-batch padding); their summed
    shares are the batch's loss."""
    layers, rows, length, experts, k = 2, 4, 9, 6, 2
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(layers, rows, length, experts)).astype(np.float32) * 2
    valid = np.ones((rows, length), bool)
    valid[1] = False
    valid[2, 6:] = False
    valid[3] = not empty_micro_batch
    segments = valid.astype(np.int32)
    batch = batch_from_packed_rows(np.zeros((rows, length + 1), np.int32),
                                   np.pad(segments, [(0, 0), (0, 1)], mode="edge"))
    np.testing.assert_array_equal(np.asarray(batch.valid), valid)
    micro_rows = [np.array([0, 2]), np.array([1, 3])]
    norms = normalizers(batch, 0, micro_batches=2)

    def micro_stats(rows_of):
        per_layer = []
        for layer_logits in logits[:, rows_of]:
            flat = jnp.asarray(layer_logits.reshape(-1, experts))
            probs, _, chosen = route(flat, k, True)
            per_layer.append(router_stats(flat, probs, chosen, experts,
                                          jnp.asarray(valid[rows_of]), len(rows_of)))
        return RouterStats(*(jnp.stack(parts) for parts in zip(*per_layer)))

    stats = [micro_stats(rows_of) for rows_of in micro_rows]
    counts = sum(s.expert_counts for s in stats)
    fractions = expert_fractions(stats[0]._replace(expert_counts=counts), norms.router_tokens)
    if scope == "global_running":  # each micro-batch's f: the counts seen up to it
        seen = [SeenCounts(sum((s.expert_counts for s in stats[:m]), jnp.zeros_like(counts)),
                           sum((s.num_tokens[0] for s in stats[:m]), jnp.zeros(())))
                for m in range(len(stats))]
        fractions = [running_fractions(s, before) for s, before in zip(stats, seen)]
    else:
        fractions = [fractions] * len(stats)
    ours = sum(float(scoped_load_balancing_loss(s, f, norms, scope))
               for s, f in zip(stats, fractions))
    probs = np.asarray(jax.nn.softmax(logits.astype(np.float64), axis=-1))
    expected = numpy_lbl(probs, valid, k, scope, micro_rows)
    assert ours == pytest.approx(expected, rel=1e-5)
    assert ours > k  # random logits are not balanced


def test_loss_config_errors():
    from qnext_jax.config import ConfigError
    with pytest.raises(ConfigError, match=r"unknown key loss.mtp_wieght \(did you mean 'mtp_weight'\?\)"):
        LossConfig.from_dict({"mtp_wieght": 0.3})
    with pytest.raises(ConfigError, match="loss.lbl_formula must be one of"):
        LossConfig(lbl_formula="per_device")
    with pytest.raises(ConfigError, match="loss.lbl_scope must be one of"):
        LossConfig(lbl_scope="device")
    with pytest.raises(ConfigError, match="hf_pooled .* takes loss.lbl_scope=global"):
        LossConfig(lbl_formula="hf_pooled", lbl_scope="sequence")
