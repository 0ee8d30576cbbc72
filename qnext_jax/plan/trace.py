"""Planning a run on paper: the train step traced and lowered on a mesh that need not exist,
and the bytes each device holds. Nothing is allocated; the model is only shapes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from qnext_jax.config import ModelConfig
from qnext_jax.data.batch import Batch
from qnext_jax.ops.platform import lowering_for
from qnext_jax.parallel.axes import ShardingRules
from qnext_jax.parallel.mesh import MeshConfig, make_abstract_mesh
from qnext_jax.train.losses import LossConfig
from qnext_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from qnext_jax.train.step import Trainer, abstract_state, make_trainer, map_with_shardings


def abstract_inputs(trainer: Trainer, global_batch: int, sequence_length: int):
    """ShapeDtypeStructs (with shardings) of the train state and of one batch."""
    state = abstract_state(trainer)
    column = {"loss_mask": jnp.float32}
    batch = Batch(*(
        jax.ShapeDtypeStruct((global_batch, sequence_length), column.get(name, jnp.int32),
                             sharding=trainer.batch_sharding)
        for name in Batch._fields
    ))
    return state, batch


def planned_trainer(config: ModelConfig, mesh_config: MeshConfig, num_devices: int, *,
                    micro_batches: int = 1, mesh=None) -> Trainer:
    """A trainer over an abstract mesh of `num_devices` (or over `mesh`, to compile)."""
    mesh = make_abstract_mesh(mesh_config, num_devices) if mesh is None else mesh
    optimizer_config = OptimizerConfig()
    return make_trainer(config, make_optimizer(optimizer_config),
                        learning_rate_schedule(optimizer_config), ShardingRules(config, mesh),
                        loss_config=LossConfig(), micro_batches=micro_batches)


def lower_train_step(trainer: Trainer, global_batch: int, sequence_length: int,
                     platform: str | None = "tpu"):
    """The train step lowered for `platform` ("tpu", "cuda", "cpu"; None: the local backend),
    with the kernel choices of that platform (ops.platform.lowering_for). For `cuda`, give
    the trainer a mesh of compile-only GPUs (plan.compiler.target_devices): tokamax and jax's
    Pallas Triton lowering refuse an abstract or CPU mesh."""
    state, batch = abstract_inputs(trainer, global_batch, sequence_length)
    if platform is None:
        return trainer.step.trace(state, batch).lower()
    mesh = trainer.batch_sharding.mesh
    replicated = NamedSharding(mesh, P())
    # A mesh of the platform's (compile-only) devices is also the default device while
    # tracing: kernels that check their device then see the target (tokamax, Pallas Triton).
    device = None if isinstance(mesh, AbstractMesh) else mesh.devices.flat[0]
    if device is not None and device.platform == "cpu":
        device = None
    with lowering_for(platform), jax.default_device(device):
        # A new function around the same step: jax caches traces per Python function and
        # shapes (across jit objects too), and a trace made for another platform would be reused.
        def step_for_platform(state, batch):
            return trainer.step.__wrapped__(state, batch)

        step = jax.jit(step_for_platform,
                       out_shardings=(trainer.state_shardings, replicated), donate_argnums=0)
        return step.trace(state, batch).lower(lowering_platforms=(platform,))


def bytes_per_device(abstract_tree, shardings) -> int:
    """Largest shard of every array, summed: what one device stores of the tree."""
    sizes = map_with_shardings(
        lambda sharding, leaf: math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize,
        shardings, abstract_tree,
    )
    return sum(jax.tree.leaves(sizes))


def state_bytes_per_device(trainer: Trainer) -> dict[str, int]:
    state = jax.eval_shape(trainer.init)
    shardings = trainer.state_shardings
    return {
        "params": bytes_per_device(state.params, shardings.params),
        "optimizer": bytes_per_device(state.opt_state, shardings.opt_state),
    }

