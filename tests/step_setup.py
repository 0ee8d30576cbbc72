"""Shared setup of the train-step tests (also used by the multi-process worker)."""

import numpy as np

from qnext_jax.config import ModelConfig
from qnext_jax.data.batch import batch_from_packed_rows
from qnext_jax.parallel.axes import ShardingRules
from qnext_jax.parallel.mesh import MeshConfig, make_mesh
from qnext_jax.train.losses import LossConfig
from qnext_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from qnext_jax.train.step import make_trainer

# Adam's first update is lr * g / (|g| + eps): for |g| >> eps it is lr * sign(g), which turns
# fp32 reduction-order noise in near-zero gradients into +-lr. A larger eps keeps the update
# Lipschitz in the gradient, so comparing parameters compares the sharded gradients.
OPTIMIZER = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, eps=1e-3)

# Pure data parallelism is the data axis of the first mesh (and of the 2-process test).
MESHES = {
    "data2_expert2_tensor2": MeshConfig(data=2, fsdp=1, expert=2, tensor=2),
    "fsdp4_expert2": MeshConfig(fsdp=4, expert=2),
    "expert4_tensor2": MeshConfig(fsdp=1, expert=4, tensor=2),
}


def tiny_config(repo_root) -> ModelConfig:
    # One block of the hybrid pattern (3 DeltaNet + 1 attention), MoE, MTP: compiles quickly.
    return ModelConfig.from_yaml(repo_root / "configs" / "tiny.yaml").replace(num_hidden_layers=4)


def packed_rows(rows=8, length=32, seed=0):
    """(tokens, segment ids) [rows, length + 1]: two documents per row, padding at the end of
    row 0."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (rows, length + 1))
    segments = np.ones((rows, length + 1), np.int32)
    segments[:, 20:] = 2
    segments[0, length - 2:] = 0
    return tokens, segments


def packed_batch(rows=8, length=32, seed=0):
    return batch_from_packed_rows(*packed_rows(rows, length, seed))


def trainer_for(config, mesh_config, devices=None, micro_batches=1, loss_config=LossConfig()):
    rules = ShardingRules(config, make_mesh(mesh_config, devices))
    return make_trainer(config, make_optimizer(OPTIMIZER), learning_rate_schedule(OPTIMIZER),
                        rules, micro_batches=micro_batches, loss_config=loss_config)
