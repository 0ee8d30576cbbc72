"""Before a run on a GPU or TPU allocates anything: its step compiled ahead, and the memory the
compiler says a device needs against what the device's allocator holds. A run that cannot fit
stops here, in seconds to minutes, instead of after loading an 80B checkpoint; one that fits
runs the executable compiled here (no second compile).

`python -m qnext_jax.plan` does the same for hardware that is not at hand, with the buffers
that make the peak and what would help."""

from __future__ import annotations

from qnext_jax.config import ConfigError
from qnext_jax.parallel.mesh import MESH_AXES
from qnext_jax.plan.trace import abstract_inputs
from qnext_jax.train.run_config import RunConfig
from qnext_jax.train.step import Trainer

GiB = 1024 ** 3


class DoesNotFit(ConfigError):
    pass


def peak_bytes(memory) -> int:
    """A device's peak from a compiled program's memory analysis: arguments (the donated ones
    reused for the outputs), the outputs that could not reuse them, temporaries and code."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes
            + memory.generated_code_size_in_bytes)


def device_memory_limit(trainer: Trainer) -> int | None:
    """Bytes the allocator of the mesh's first device may hand out (None on a CPU, whose
    memory is the host's)."""
    device = trainer.batch_sharding.mesh.devices.flat[0]
    if device.platform == "cpu":
        return None
    return (device.memory_stats() or {}).get("bytes_limit")


def compile_checked(trainer: Trainer, config: RunConfig, limit: int | None) -> Trainer:
    """The trainer with its step compiled for the run's batch; DoesNotFit, naming what to
    change, when the compiled step needs more than `limit` bytes a device. With no limit, the
    trainer unchanged."""
    from qnext_jax.plan.planner import fit_advice

    if limit is None:
        return trainer
    tc = config.train
    state, batch = abstract_inputs(trainer, tc.batch_size, tc.seq_len)
    compiled = trainer.step.trace(state, batch).lower().compile()
    memory = compiled.memory_analysis()
    peak = peak_bytes(memory)
    if peak > limit:
        mesh = trainer.batch_sharding.mesh
        sizes = {name: mesh.shape.get(name, 1) for name in MESH_AXES}
        tips = fit_advice(config, sizes, memory.argument_size_in_bytes,
                          memory.temp_size_in_bytes, limit)
        raise DoesNotFit(
            f"the train step needs {peak / GiB:.2f} GiB a device (parameters, optimizer state "
            f"and batch {memory.argument_size_in_bytes / GiB:.2f}, temporaries "
            f"{memory.temp_size_in_bytes / GiB:.2f}) but the device's allocator holds "
            f"{limit / GiB:.2f} GiB. Try: " + "; ".join(tips) + ". `python -m qnext_jax.plan "
            "RUN_CONFIG --target ...` lists the buffers that make the peak")
    return trainer._replace(step=compiled)
