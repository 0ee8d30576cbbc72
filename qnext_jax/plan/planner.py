"""Does a run fit its target? The run's own train step (model, mesh, batch, micro-batches, remat,
dtypes, kernels) compiled for the target's devices, with the verdict and what would help."""

from __future__ import annotations

import dataclasses

from qnext_jax.config import ConfigError
from qnext_jax.plan.compiler import Compiled, compile_step, target_devices
from qnext_jax.parallel.mesh import make_mesh
from qnext_jax.plan.targets import Target
from qnext_jax.train.run_config import RunConfig, check_run_config

DEFAULT_HEADROOM = 0.10  # of a device's memory, kept free for the allocator and the runtime


@dataclasses.dataclass(frozen=True)
class Plan:
    target: Target
    config: RunConfig
    mesh: dict[str, int]
    compiled: Compiled
    model_flops: float  # a device's share of the model's FLOPs per step (remat not counted)
    headroom: float

    @property
    def budget(self) -> int:
        return int(self.target.memory * (1 - self.headroom))

    @property
    def fits(self) -> bool:
        return self.compiled.peak <= self.budget

    @property
    def compute_seconds(self) -> float:
        """The step at the chip's dense bf16 peak: the larger of the compiled program's FLOPs
        (which miss the custom-call kernels) and the model's."""
        return max(self.compiled.flops, self.model_flops) / self.target.peak_flops

    @property
    def memory_seconds(self) -> float:
        """The compiled program's bytes accessed at the memory's bandwidth."""
        return self.compiled.bytes_accessed / self.target.bandwidth

    @property
    def floor_seconds(self) -> float:
        return max(self.compute_seconds, self.memory_seconds)

    def advice(self) -> list[str]:
        """What would bring the peak under the budget, most effective first."""
        if self.fits:
            return []
        return fit_advice(self.config, self.mesh, self.compiled.arguments,
                          self.compiled.temporaries, self.budget)


def fit_advice(config: RunConfig, mesh: dict[str, int], arguments: float, temporaries: float,
               budget: float) -> list[str]:
    """The changes that would bring a step that does not fit under `budget` bytes a device,
    most effective first, from where its memory goes (arguments: parameters, optimizer state
    and batch; temporaries: activations and the step's buffers)."""
    tips = []
    rows = config.train.batch_size // (config.train.micro_batches
                                       * mesh["data"] * mesh["fsdp"] * mesh["expert"])
    if temporaries > arguments:
        if config.model.remat_policy != "full":
            tips.append(f"model.remat_policy=full (now {config.model.remat_policy}): keep "
                        "only each layer's input for the backward pass")
        if rows > 1:
            tips.append(f"train.micro_batches={config.train.micro_batches * 2}: "
                        f"{rows} rows a device per micro-batch now; half the activations")
        if config.train.seq_len >= 8192 and mesh["sequence"] == 1:
            tips.append("mesh.sequence=N: split each row's tokens over N devices")
    if mesh["data"] > 1:
        tips.append(f"mesh.fsdp={mesh['fsdp'] * mesh['data']} mesh.data=1: shard the "
                    "parameters and optimizer state over the data-parallel devices too")
    elif arguments > 0.3 * budget:
        tips.append("more devices on mesh.fsdp, mesh.sequence or mesh.expert: the parameters "
                    f"and optimizer state take {arguments / 2**30:.1f} GiB a device")
    if not tips:
        tips.append("a target with more memory a device, or more devices")
    return tips


def plan_run(config: RunConfig, target: Target, *, headroom: float = DEFAULT_HEADROOM,
             dump: str | None = None) -> Plan:
    """Compiles `config`'s train step for `target`. Everything checkable without compiling is
    checked first (mesh against the target's devices, batch against the mesh). dump: a
    directory to keep the compiler's dump in (its buffer assignment, every pass's module)."""
    from qnext_jax.parallel.axes import ShardingRules
    from qnext_jax.train.step import (check_batch_size, check_sequence_split,
                                      check_trainable_dtypes, trainer_for_run)

    if not 0 <= headroom < 1:
        raise ConfigError(f"headroom must be in [0, 1), got {headroom}")
    check_run_config(config)
    check_trainable_dtypes(config.model)
    sizes = config.mesh.resolve(target.chips)  # the mesh must cover the target exactly
    devices = target_devices(target)
    mesh = make_mesh(config.mesh, devices)
    tc = config.train
    check_batch_size(tc.batch_size, tc.micro_batches, mesh)
    check_sequence_split(tc.seq_len, mesh, config.model)
    trainer = trainer_for_run(config, ShardingRules(config.model, mesh))
    compiled = compile_step(trainer, tc.batch_size, tc.seq_len, target, dump=dump)
    tokens_per_device = tc.batch_size * tc.seq_len / target.chips
    model_flops = config.model.training_flops_per_token(tc.seq_len) * tokens_per_device
    return Plan(target=target, config=config, mesh=sizes, compiled=compiled,
                model_flops=model_flops, headroom=headroom)
