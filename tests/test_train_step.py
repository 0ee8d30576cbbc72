"""The sharded train step on 8 host CPU devices: the same numbers on every mesh, the specs the
table promises, global-batch load balancing, gradient accumulation, and several processes."""

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import REPO_ROOT
from qnext_jax.data.batch import Batch
from qnext_jax.model import Qwen3NextModel
from qnext_jax.train.losses import LossConfig, all_router_stats, loss_terms, normalizers
from qnext_jax.train.step import abstract_state
from step_setup import MESHES, MeshConfig, packed_batch, tiny_config, trainer_for
from two_processes import run_two_processes

LOSS_KEYS = ("loss", "ce_loss", "mtp_loss", "lbl_loss", "z_loss", "grad_norm")


def run_step(config, mesh_config, batch, devices=None, micro_batches=1, loss_config=LossConfig()):
    trainer = trainer_for(config, mesh_config, devices, micro_batches, loss_config)
    state, metrics = trainer.step(trainer.init(), jax.device_put(batch, trainer.batch_sharding))
    return trainer, state, {k: np.asarray(v) for k, v in metrics.items()}


def flat_params(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def assert_same_step(metrics, params, ref_metrics, ref_params):
    for key in LOSS_KEYS:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(metrics["expert_load"], ref_metrics["expert_load"], atol=1e-6)
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        ours = params[name]
        assert np.linalg.norm(ours - ref) <= 1e-5 * np.linalg.norm(ref), name
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.fixture(scope="module")
def config():
    return tiny_config(REPO_ROOT)


@pytest.fixture(scope="module")
def single_device(config):
    _, state, metrics = run_step(config, MeshConfig(fsdp=1), packed_batch(), jax.devices()[:1])
    return metrics, flat_params(state.params)


@pytest.fixture(scope="module")
def mesh_steps(config):
    """One trainer per mesh (compiling is the slow part), its step on packed_batch() kept."""
    cache = {}

    def get(name):
        if name not in cache:
            trainer = trainer_for(config, MESHES[name])
            state, metrics = trainer.step(
                trainer.init(), jax.device_put(packed_batch(), trainer.batch_sharding))
            cache[name] = (trainer, state, {k: np.asarray(v) for k, v in metrics.items()})
        return cache[name]

    return get


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_every_mesh_gives_the_single_device_step(single_device, mesh_steps, mesh_name):
    _, state, metrics = mesh_steps(mesh_name)
    ref_metrics, ref_params = single_device
    assert ref_metrics["mtp_loss"] > 1.0 and ref_metrics["lbl_loss"] > 1.0  # both terms are on
    assert_same_step(metrics, flat_params(state.params), ref_metrics, ref_params)
    assert int(state.step) == 1
    if mesh_name == "data2_expert2_tensor2":
        check_specs(state)


def check_specs(state):
    """The shardings of parameters and Adam moments are the table's (a leading None is the
    stacked-layer axis)."""
    params = nnx.to_flat_state(state.params)
    spec = {"/".join(map(str, path)): v.value.sharding.spec for path, v in params}
    # Every weight's width over the axes that would replicate it; the experts' over the rest.
    W, EW = ("fsdp", "sequence", "expert"), ("fsdp", "sequence")
    expected = {
        "embed": P("tensor", W),
        "lm_head": P(W, "tensor"),
        "final_norm/weight": P(None),
        "blocks/layers/0/mixer/q_proj": P(None, W, "tensor", None),
        "blocks/layers/0/mixer/v_proj": P(None, W, "tensor", None),
        "blocks/layers/0/mixer/A_log": P(None, "tensor"),
        "blocks/layers/0/mixer/conv_q": P(None, None, "tensor", None),
        "blocks/layers/0/mixer/out_proj": P(None, "tensor", None, W),
        "blocks/layers/3/mixer/q_proj": P(None, W, "tensor", None),
        "blocks/layers/3/mixer/k_proj": P(None, W, "tensor", None),  # 2 kv heads, tensor 2
        "blocks/layers/3/mixer/o_proj": P(None, "tensor", None, W),
        "blocks/layers/0/mlp/router": P(None, W, None),
        "blocks/layers/0/mlp/gate_proj": P(None, "expert", EW, "tensor"),
        "blocks/layers/0/mlp/down_proj": P(None, "expert", "tensor", EW),
        "blocks/layers/0/mlp/shared_expert/up_proj": P(None, W, "tensor"),
        "mtp/fc": P(None, W),
        "mtp/layers/0/mlp/gate_proj": P("expert", EW, "tensor"),
    }
    for name, want in expected.items():
        assert spec[name] == want, name
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw = chain(scale_by_adam, ...)
    for moment in (adam.mu, adam.nu):
        moments = {"/".join(map(str, p)): v.value.sharding.spec for p, v in nnx.to_flat_state(moment)}
        assert moments == spec
    assert adam.count.sharding.spec == P()


def test_accumulated_micro_batches_equal_one_large_batch(config, single_device):
    """4 micro-batches of 2 rows, on 4 devices (expert 2 x tensor 2), == the one 8-row batch on
    one device: losses (the exact global LBL included), gradient norm, updated parameters."""
    mesh = MeshConfig(fsdp=1, expert=2, tensor=2)
    _, state, metrics = run_step(config, mesh, packed_batch(), jax.devices()[:4], micro_batches=4,
                                 loss_config=LossConfig(lbl_scope="global"))
    assert_same_step(metrics, flat_params(state.params), *single_device)


def test_global_lbl_is_the_whole_batch_lbl_not_the_mean_of_shard_lbls(config, mesh_steps):
    trainer, _, _ = mesh_steps("fsdp4_expert2")
    model = Qwen3NextModel(config, rngs=nnx.Rngs(0))
    batch = packed_batch(rows=8)
    # Shards that route differently: half the rows repeat one token, half another.
    ids = np.asarray(batch.input_ids).copy()
    ids[:4], ids[4:] = 7, 200
    batch = batch._replace(input_ids=ids)

    @jax.jit
    def forward_and_lbl(b):
        out = model(b.input_ids, positions=b.positions, segment_ids=b.segment_ids, valid=b.valid)
        terms = loss_terms(out, b, normalizers(b, config.mtp_depth), LossConfig(), 1e-3)
        return terms["lbl_loss"], out

    def lbl(b):
        value, out = forward_and_lbl(b)
        return float(value), out

    whole, out = lbl(batch)
    # By hand from the statistics: per layer E * sum_i f_i P_i over the whole batch, averaged.
    stats = [out.router_stats, out.mtp_router_stats]
    counts = np.concatenate([s.expert_counts for s in stats])
    probs = np.concatenate([s.prob_sums for s in stats])
    tokens = float(np.asarray(batch.valid).sum())
    by_hand = np.mean(config.num_experts * np.sum(counts / tokens * probs / tokens, axis=-1))
    assert whole == pytest.approx(by_hand, rel=1e-5)

    shard = lambda i: Batch(*(x[2 * i: 2 * i + 2] for x in batch))  # noqa: E731
    mean_of_shards = np.mean([lbl(shard(i))[0] for i in range(4)])
    assert abs(mean_of_shards - whole) > 0.05 * whole  # per-shard balance is a different loss

    # And the 8-device mesh computes the whole-batch value (same shapes: no recompilation).
    _, metrics = trainer.step(trainer.init(), jax.device_put(batch, trainer.batch_sharding))
    assert float(metrics["lbl_loss"]) == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize("scope", ["micro_batch", "sequence", "global_running"])
def test_lbl_scopes_in_the_accumulating_step(config, scope):
    """Two micro-batches: the micro-batch scope is the mean of each micro-batch's own
    (whole-batch) LBL, the sequence scope the one-pass value of the whole batch, the running
    global scope the second micro-batch balanced on both micro-batches' counts, the first on
    its own. Also the logged norm_scale_max is the largest |1 + w| of the updated RMSNorm
    weights."""
    batch = packed_batch()
    _, state, metrics = run_step(config, MeshConfig(fsdp=1), batch, jax.devices()[:1],
                                 micro_batches=2, loss_config=LossConfig(lbl_scope=scope))
    model = Qwen3NextModel(config, rngs=nnx.Rngs(0))  # the trainer's initial parameters

    @functools.partial(jax.jit, static_argnums=1)
    def lbl(b, loss_config):
        out = model(b.input_ids, positions=b.positions, segment_ids=b.segment_ids, valid=b.valid)
        return loss_terms(out, b, normalizers(b, config.mtp_depth), loss_config, 1e-3)["lbl_loss"]

    halves = [Batch(*(x[m::2] for x in batch)) for m in range(2)]  # rows m, m + 2, ...
    if scope == "micro_batch":
        expected = np.mean([float(lbl(half, LossConfig())) for half in halves])
        whole = float(lbl(batch, LossConfig()))
        assert abs(whole - expected) > 1e-4 * whole  # the scopes differ on this batch
    elif scope == "global_running":
        @jax.jit
        def stats_of(b):
            out = model(b.input_ids, positions=b.positions, segment_ids=b.segment_ids,
                        valid=b.valid)
            return all_router_stats(out)

        expected, counts_seen, tokens_seen = 0.0, 0.0, 0.0
        all_tokens = float(np.asarray(batch.valid).sum())
        for half in halves:
            stats = stats_of(half)
            counts_seen = counts_seen + np.asarray(stats.expert_counts, np.float64)
            tokens_seen += float(np.asarray(half.valid).sum())
            fractions = counts_seen / tokens_seen
            probs = np.asarray(stats.prob_sums, np.float64) / all_tokens
            expected += np.mean(config.num_experts * np.sum(fractions * probs, axis=-1))
        whole = float(lbl(batch, LossConfig(lbl_scope="global")))
        assert abs(whole - expected) > 1e-4 * whole  # the global forms differ on this batch
    else:
        expected = float(lbl(batch, LossConfig(lbl_scope="sequence")))
    assert float(metrics["lbl_loss"]) == pytest.approx(expected, rel=1e-5)
    norm_weights = [np.asarray(w) for name, w in flat_params(state.params).items()
                    if "norm" in name and "mixer']['norm" not in name]
    assert len(norm_weights) == 18  # 8 layer norms, final, q/k x 2 attentions, MTP's 3 + 2
    largest = max(np.abs(1 + w).max() for w in norm_weights)
    assert float(metrics["norm_scale_max"]) == pytest.approx(largest, rel=1e-6)


def test_running_global_lbl_runs_no_second_forward(config):
    """XLA's cost analysis of the lowered step (a loop body counts once): the exact global
    scope adds a forward-only routing pass over the micro-batches; the running form costs
    what a scope without global counts costs."""
    flops = {}
    for scope in ("global", "global_running", "micro_batch"):
        trainer = trainer_for(config, MeshConfig(fsdp=1), jax.devices()[:1], micro_batches=2,
                              loss_config=LossConfig(lbl_scope=scope))
        batch = jax.device_put(packed_batch(), trainer.batch_sharding)
        flops[scope] = trainer.step.lower(abstract_state(trainer), batch).cost_analysis()["flops"]
    assert flops["global_running"] == pytest.approx(flops["micro_batch"], rel=0.01)
    assert flops["global"] > 1.2 * flops["global_running"]


def test_two_processes_of_four_devices_equal_one_of_eight(mesh_steps, tmp_path):
    out = tmp_path / "result.npz"
    run_two_processes("multiprocess_worker.py", str(out))
    result = dict(np.load(out))
    assert int(result.pop("rows_per_process")) == 4  # each process loaded half the batch
    metrics = {k[len("metric/"):]: result.pop(k) for k in list(result) if k.startswith("metric/")}

    _, state, ref_metrics = mesh_steps("data2_expert2_tensor2")
    assert_same_step(metrics, result, ref_metrics, flat_params(state.params))
