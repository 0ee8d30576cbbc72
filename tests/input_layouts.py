"""Training and evaluation input where a mesh axis that splits tokens or weights, not rows,
spans processes: each process loads the rows its devices hold (`process_rows`), processes
sharing rows load the same ones. Run by tests/multiprocess_input_worker.py in each of two
processes and by tests/test_multiprocess_input.py in one."""

from pathlib import Path

import numpy as np

from qnext_jax.data.pipeline import InMemoryRows, batch_dataset
from qnext_jax.parallel.distributed import global_batch, process_rows
from qnext_jax.parallel.mesh import MeshConfig
from qnext_jax.train.evaluation import Evaluator
from qnext_jax.train.run_config import load_run_config
from step_setup import trainer_for

REPO_ROOT = Path(__file__).parent.parent
BATCH, LENGTH, STEPS = 8, 32, 2


def in_device_order(devices):
    return list(devices)


def tensor_pairs_across_processes(devices):
    """Device i of the first process next to device i of the second: each `tensor` pair
    (the innermost axis) joins the two processes."""
    by_process = {}
    for device in devices:
        by_process.setdefault(device.process_index, []).append(device)
    if len(by_process) == 1:  # one process: the same mesh shape is all that can be matched
        return list(devices)
    first, second = by_process.values()
    return [d for pair in zip(first, second) for d in pair]


LAYOUTS = {
    # Every device holds every row; the sequence shards of process 0 are the first half.
    "sequence8": (MeshConfig(fsdp=1, sequence=8), in_device_order),
    "tensor_across_processes": (MeshConfig(fsdp=4, tensor=2), tensor_pairs_across_processes),
}


def packed_rows(count, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (count, LENGTH + 1))
    segments = np.ones((count, LENGTH + 1), np.int32)
    segments[rng.integers(5, LENGTH, count)[:, None] <= np.arange(LENGTH + 1)] = 2
    segments[::3, -4:] = 0  # some padding
    return InMemoryRows(tokens, segments)


def run_layout(name, devices) -> dict:
    """Two train steps in two micro-batches (whose split the running global LBL sees) and an
    evaluation of two batches: the losses."""
    mesh_config, order = LAYOUTS[name]
    config = load_run_config(None, [
        f"model.preset={REPO_ROOT / 'configs' / 'tiny.yaml'}", "model.num_hidden_layers=4",
        f"train.batch_size={BATCH}", f"train.seq_len={LENGTH}", "train.micro_batches=2",
    ])
    trainer = trainer_for(config.model, mesh_config, order(devices), micro_batches=2,
                          loss_config=config.loss)
    held = process_rows(BATCH, trainer.batch_sharding)
    # Every device holds (part of) every row: each process loads them all.
    assert held.tolist() == list(range(BATCH)), held
    data = iter(batch_dataset(packed_rows(4 * BATCH, seed=0), BATCH, seed=0, held_rows=held))
    state, losses = trainer.init(), []
    for _ in range(STEPS):
        batch = global_batch(next(data), trainer.batch_sharding, BATCH)
        state, metrics = trainer.step(state, batch)
        losses.append({k: float(metrics[k]) for k in ("loss", "ce_loss", "mtp_loss", "lbl_loss")})
    evaluated = Evaluator(trainer, config, packed_rows(2 * BATCH, seed=1), 2)(state)
    return {"held_rows": held.tolist(), "train": losses, "eval": evaluated}
