"""Multi-process runs: joining the job, and each process feeding its share of the batch."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding

from qnext_jax.parallel.mesh import MeshError

# Set these three to run one process per host (or several on one host for CPU tests).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # host:port of process 0
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def initialize_from_env() -> bool:
    """`jax.distributed.initialize` when the environment names a coordinator; returns whether
    this is a multi-process run. Must run before anything touches the devices."""
    address = os.environ.get(COORDINATOR_ENV)
    if not address:
        return False
    missing = [name for name in (NUM_PROCESSES_ENV, PROCESS_ID_ENV) if name not in os.environ]
    if missing:
        raise MeshError(f"{COORDINATOR_ENV} is set but {missing} are not")
    # Collectives between the CPU devices of several processes go through gloo (XLA:CPU has no
    # other transport); the setting touches only the CPU client, so GPU/TPU runs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=int(os.environ[NUM_PROCESSES_ENV]),
        process_id=int(os.environ[PROCESS_ID_ENV]),
    )
    return True


def process_rows(global_rows: int, sharding: NamedSharding) -> slice:
    """The rows of a [global_rows, ...] batch that this process's devices hold: what it loads."""
    indices = sharding.addressable_devices_indices_map((global_rows, 1))
    starts = sorted({index[0].indices(global_rows)[0] for index in indices.values()})
    stops = sorted({index[0].indices(global_rows)[1] for index in indices.values()})
    rows = slice(starts[0], stops[-1])
    held = sum(stop - start for start, stop in zip(starts, stops))
    if held != rows.stop - rows.start:
        raise MeshError(
            f"this process's devices hold rows {list(zip(starts, stops))} of the batch, not one "
            "contiguous block; order the mesh so that each process's devices are adjacent"
        )
    return rows


def global_batch(local, sharding: NamedSharding, global_rows: int):
    """A pytree of process-local numpy arrays (its `process_rows`) -> global jax.Arrays."""
    def place(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (global_rows,) + x.shape[1:])

    return jax.tree.map(place, local)
