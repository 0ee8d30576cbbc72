"""One jit-compiled, sharded training step: micro-batches, losses, clipping, AdamW.

Shapes first (`jax.eval_shape`), then shardings from the logical-axis table, then a jitted init
that creates every parameter and optimizer moment directly in its sharding, then the step with
the train state donated (updated in place: no second copy of the model).

Gradient accumulation runs inside the jit. Every loss term is normalised by global-batch counts
(train/losses.py), so the summed gradients of M micro-batches are exactly the gradient of the
whole batch. The load-balancing loss of the exact `global` scope needs the expert counts of the
whole batch before any micro-batch's gradient: with M > 1 a forward-only routing pass over the
micro-batches collects them first (one more forward of every micro-batch, no activations kept).
The default `global_running` scope carries the counts of the micro-batches seen so far through
the accumulation loop instead (no second pass); with M = 1 both are the forward's own counts.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from qnext_jax.config import LINEAR_ATTENTION, ConfigError, ModelConfig
from qnext_jax.data.batch import Batch
from qnext_jax.model import Qwen3NextModel, abstract_model
from qnext_jax.model.norms import largest_norm_scale
from qnext_jax.parallel.axes import ShardingRules
from qnext_jax.parallel.mesh import MeshError, axis_size, batch_shards
from qnext_jax.train.losses import (LossConfig, SeenCounts, all_router_stats, loss_terms,
                                    normalizers)
from qnext_jax.train.optimizer import learning_rate_schedule, make_optimizer


class TrainState(NamedTuple):
    step: jnp.ndarray  # [] int32, optimizer steps taken
    params: Any  # nnx.State of the model's Params (fp32)
    opt_state: Any  # optax state; moments sharded like their parameters


class Trainer(NamedTuple):
    """What a training loop needs: the model structure, shardings and the compiled functions."""

    graphdef: Any
    state_shardings: TrainState
    batch_sharding: NamedSharding
    init: Callable[[], TrainState]  # jitted: the initial state, already sharded
    init_from: Callable[[Any], TrainState]  # jitted: step 0 and fresh moments for given params
    step: Callable[[TrainState, Batch], tuple[TrainState, dict]]  # jitted, donates the state


def router_layer_names(config: ModelConfig) -> list[str]:
    """Names of the router-statistics rows, in order (for logs and plots)."""
    names = [f"layer {i}" for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    if config.mtp_uses_moe:
        names += [f"mtp {d + 1}.{i}" for d in range(config.mtp_depth)
                  for i in range(config.mtp_num_hidden_layers)]
    return names


def router_layers(config: ModelConfig) -> int:
    """Rows of the router statistics: the main model's MoE layers, then the MTP module's."""
    return len(router_layer_names(config))


def check_trainable_dtypes(config: ModelConfig) -> None:
    """Training keeps fp32 parameters: they are the master weights, and AdamW's moments follow
    their dtype."""
    if config.param_dtype != "float32":
        raise ConfigError(
            f"model.param_dtype={config.param_dtype} would train without fp32 master weights: "
            "AdamW's moments and every update would be rounded to it (at lr 3e-4 a weight of "
            "1.0 never moves in bf16). Train with model.param_dtype=float32 and compute in "
            "bf16 with model.dtype=bfloat16; bf16 parameters are for inference")


def check_batch_size(global_batch: int, micro_batches: int, mesh) -> None:
    shards = batch_shards(mesh)
    if global_batch % micro_batches or (global_batch // micro_batches) % shards:
        raise MeshError(
            f"global batch {global_batch} must split into {micro_batches} micro-batches whose "
            f"size is a multiple of the batch shards data*fsdp*expert = {shards}"
        )


def check_sequence_split(seq_len: int, mesh, config: ModelConfig) -> None:
    """Each sequence shard holds seq_len / mesh.sequence tokens: a whole number, and enough for
    the DeltaNet conv's halo (which comes from the previous shard alone)."""
    shards = axis_size(mesh, "sequence")
    if seq_len % shards:
        raise MeshError(f"train.seq_len = {seq_len} is not divisible by mesh.sequence = {shards}")
    halo = config.linear_conv_kernel_dim - 1
    if shards > 1 and seq_len // shards < halo and LINEAR_ATTENTION in config.mixer_types:
        raise MeshError(
            f"mesh.sequence = {shards} leaves {seq_len // shards} tokens per shard, fewer than the "
            f"DeltaNet conv needs from its neighbour (linear_conv_kernel_dim - 1 = {halo})")


def split_micro_batches(batch: Batch, micro_batches: int, batch_sharding=None) -> Batch:
    """[B, T] -> [M, B/M, T]; micro-batch m holds rows m, M+m, 2M+m, ... so that each device's
    rows split evenly and no row moves between devices (`batch_sharding`, the [B, T] arrays'
    sharding, pins each micro-batch to it)."""
    def split(x):
        rows = x.shape[0] // micro_batches
        x = jnp.swapaxes(x.reshape(rows, micro_batches, *x.shape[1:]), 0, 1)
        if batch_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(batch_sharding.mesh, PartitionSpec(None, *batch_sharding.spec)))

    return jax.tree.map(split, batch)


def trainer_for_run(run_config, rules: ShardingRules) -> Trainer:
    """The trainer a run config trains with (train.loop) and plans with (qnext_jax.plan)."""
    tc = run_config.train
    return make_trainer(run_config.model, make_optimizer(run_config.optimizer),
                        learning_rate_schedule(run_config.optimizer), rules,
                        loss_config=run_config.loss, micro_batches=tc.micro_batches,
                        seed=tc.seed)


def make_trainer(config: ModelConfig, optimizer: optax.GradientTransformation,
                 schedule: optax.Schedule, rules: ShardingRules, *,
                 loss_config: LossConfig = LossConfig(), micro_batches: int = 1,
                 seed: int = 0) -> Trainer:
    if micro_batches < 1:
        raise ConfigError(f"micro_batches must be >= 1, got {micro_batches}")
    check_trainable_dtypes(config)
    graphdef, abstract_params = nnx.split(abstract_model(config, seed), nnx.Param)
    lbl_coef = config.router_aux_loss_coef if loss_config.lbl_weight is None else loss_config.lbl_weight
    mtp_depth = config.mtp_depth if config.mtp_num_hidden_layers else 0
    num_router_layers = router_layers(config)
    mesh = rules.mesh
    abstract_mesh = mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh

    def init_state() -> TrainState:
        _, params = nnx.split(Qwen3NextModel(config, rngs=nnx.Rngs(seed)), nnx.Param)
        return start_state(params)

    def start_state(params) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    abstract_state = jax.eval_shape(init_state)
    param_shardings = rules.param_shardings(abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_shardings = TrainState(
        replicated, param_shardings, rules.like_params(abstract_state.opt_state, abstract_params)
    )
    batch_sharding = rules.batch_sharding()

    def forward(params, batch: Batch, *, logits=True):
        model = nnx.merge(graphdef, params)
        output = model(batch.input_ids, positions=batch.positions, segment_ids=batch.segment_ids,
                       valid=batch.valid, logits=logits)
        return output, model.head_weight()

    def expert_counts(output):
        stats = all_router_stats(output)
        return jnp.zeros((0, 1)) if stats is None else stats.expert_counts  # [layers, E]

    def loss_fn(params, batch, norms, fractions, seen):
        output, head = forward(params, batch, logits=not loss_config.fused_head)
        terms = loss_terms(output, batch, norms, loss_config, lbl_coef, fractions, head, seen)
        return terms["loss"], (terms, expert_counts(output))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_batch_grads(params, batch, norms, fractions, seen=None):
        (_, (terms, counts)), grads = grad_fn(params, batch, norms, fractions, seen)
        return jax.lax.with_sharding_constraint(grads, param_shardings), terms, counts

    def accumulated_grads(params, batch, norms):
        micro = split_micro_batches(batch, micro_batches, batch_sharding)
        fractions = None
        if num_router_layers and loss_config.lbl_scope == "global":
            def count(total, mb):  # forward only: the whole batch's routing, before gradients
                return total + expert_counts(forward(params, mb, logits=False)[0]), None

            zero = jnp.zeros((num_router_layers, config.num_experts), jnp.float32)
            counts, _ = jax.lax.scan(count, zero, micro)
            fractions = counts / norms.router_tokens

        running = bool(num_router_layers) and loss_config.lbl_scope == "global_running"

        def accumulate(carry, mb):
            sums, tokens_seen = carry  # sums: (grads, terms, counts) of the micro-batches so far
            seen = SeenCounts(sums[2], tokens_seen) if running else None
            update = micro_batch_grads(params, mb, norms, fractions, seen)
            tokens_seen += jnp.sum(mb.valid.astype(jnp.float32))
            return (jax.tree.map(jnp.add, sums, update), tokens_seen), None

        zeros = jax.eval_shape(micro_batch_grads, params, jax.tree.map(lambda x: x[0], micro),
                               norms, fractions)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        ((grads, terms, counts), _), _ = jax.lax.scan(
            accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)
        return grads, terms, counts

    def train_step(state: TrainState, batch: Batch):
        check_batch_size(batch.input_ids.shape[0], micro_batches, mesh)
        check_sequence_split(batch.input_ids.shape[1], mesh, config)
        with jax.sharding.use_abstract_mesh(abstract_mesh):
            norms = normalizers(batch, mtp_depth, micro_batches)
            if micro_batches == 1:
                grads, terms, counts = micro_batch_grads(state.params, batch, norms, None)
            else:
                grads, terms, counts = accumulated_grads(state.params, batch, norms)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = dict(terms)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["norm_scale_max"] = largest_norm_scale(params, config.norm_style)
        metrics["lr"] = schedule(state.step)
        metrics["target_tokens"] = norms.target_tokens
        # Fraction of the routed (token, choice) pairs each expert received, per MoE layer.
        metrics["expert_load"] = counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
        return TrainState(state.step + 1, params, opt_state), metrics

    batch_shardings = Batch(*([batch_sharding] * len(Batch._fields)))
    return Trainer(
        graphdef=graphdef,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        init=jax.jit(init_state, out_shardings=state_shardings),
        init_from=jax.jit(start_state, in_shardings=(param_shardings,),
                          out_shardings=state_shardings),
        step=jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=0),
    )


def map_with_shardings(fn, shardings, tree):
    """fn(sharding, leaf) over `tree`, whose shardings tree is a prefix of it (one sharding may
    stand for a whole subtree, e.g. an nnx Variable)."""
    return jax.tree.map(lambda sharding, sub: jax.tree.map(lambda x: fn(sharding, x), sub),
                        shardings, tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def abstract_state(trainer: Trainer) -> TrainState:
    """The train state as ShapeDtypeStructs carrying their shardings (restore targets)."""
    return map_with_shardings(
        lambda sharding, leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        trainer.state_shardings, jax.eval_shape(trainer.init),
    )
