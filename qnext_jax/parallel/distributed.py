"""Multi-process runs: joining the job, and each process feeding its share of the batch."""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np
from jax.sharding import NamedSharding

from qnext_jax.parallel.mesh import MeshError, axis_size

# Set these three to run one process per host (or several on one host for CPU tests).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # host:port of process 0
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# Set to 1 where a launcher's variables describe several tasks that are separate runs (an
# indexed Kubernetes Job used as a sweep, say).
SINGLE_PROCESS_ENV = "QNEXT_JAX_SINGLE_PROCESS"


def _count(name: str) -> int:
    try:
        return int(os.environ.get(name, "1"))
    except ValueError:
        return 1


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def multi_process_environment() -> str | None:
    """The launcher that describes this process as one of several, or None for a
    single-process run. Besides our own variables, the schedulers whose variables
    `jax.distributed.initialize()` reads by itself: SLURM (srun), Open MPI (mpirun), a
    Kubernetes indexed Job or JobSet (with the `kubernetes` package, which JAX needs to find
    its peers), and a multi-host Cloud TPU slice. A launcher that starts a single task (one
    srun task, one pod) is a single-process run: nothing to join; QNEXT_JAX_SINGLE_PROCESS=1
    says so where the variables would suggest otherwise."""
    env = os.environ
    if env.get(COORDINATOR_ENV):
        return "explicit"
    if env.get(SINGLE_PROCESS_ENV, "") not in ("", "0"):
        return None
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in env for name in slurm) and _count("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _count("OMPI_COMM_WORLD_SIZE") > 1:
        return "open_mpi"
    if ("KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env
            and _installed("kubernetes")):  # JAX asks the Kubernetes API for its peers with it
        return "kubernetes"
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([w for w in workers.split(",") if w.strip()]) > 1:
        return "cloud_tpu"
    return None


def initialize_from_env() -> bool:
    """`jax.distributed.initialize` when the environment describes a multi-process job
    (`multi_process_environment`); returns whether it does. Must run before anything touches
    the devices. JAX's own detection then finds the coordinator, process count and id,
    except with our variables, which name them."""
    launcher = multi_process_environment()
    if launcher is None:
        return False
    # Collectives between the CPU devices of several processes go through gloo (XLA:CPU has no
    # other transport); the setting touches only the CPU client, so GPU/TPU runs are unaffected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launcher != "explicit":
        jax.distributed.initialize()
        return True
    missing = [name for name in (NUM_PROCESSES_ENV, PROCESS_ID_ENV) if name not in os.environ]
    if missing:
        raise MeshError(f"{COORDINATOR_ENV} is set but {missing} are not")
    jax.distributed.initialize(
        coordinator_address=os.environ[COORDINATOR_ENV],
        num_processes=int(os.environ[NUM_PROCESSES_ENV]),
        process_id=int(os.environ[PROCESS_ID_ENV]),
    )
    return True


def broadcast_text(text: str | None, max_bytes: int = 4096) -> str:
    """Process 0's `text`, on every process (the others may pass None)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    buffer = np.zeros(max_bytes, np.uint8)
    if jax.process_index() == 0:
        encoded = text.encode()
        if len(encoded) > max_bytes:
            raise ValueError(f"text of {len(encoded)} bytes exceeds the {max_bytes}-byte broadcast")
        buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return bytes(received[received != 0]).decode()


def process_rows(global_rows: int, sharding: NamedSharding) -> np.ndarray:
    """The rows of a [global_rows, T] batch that this process's devices hold, ascending: what
    it loads, every token of them. Where `sequence` or `tensor` spans processes, several
    processes hold (parts of) the same rows and load the same rows; each device then takes its
    part (`global_batch`)."""
    # The second dimension only has to split evenly over the sequence shards.
    shape = (global_rows, axis_size(sharding.mesh, "sequence"))
    held = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        held.update(range(*index[0].indices(global_rows)))
    return np.array(sorted(held), np.int64)


def global_batch(local, sharding: NamedSharding, global_rows: int):
    """A pytree of this process's rows (its `process_rows`, whole) -> global jax.Arrays: each
    device takes its block of rows and tokens from them."""
    def place(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (global_rows,) + x.shape[1:])

    return jax.tree.map(place, local)
