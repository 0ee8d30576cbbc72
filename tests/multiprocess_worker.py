"""One of two processes x 4 CPU devices running the same train step as the 8-device test;
writes the step's metrics and the updated parameters (gathered) to an .npz file."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false"

from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))

from qnext_jax.parallel.distributed import global_batch, initialize_from_env, process_rows  # noqa: E402

assert initialize_from_env()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from qnext_jax.data.pipeline import InMemoryRows, batch_dataset  # noqa: E402
from step_setup import MESHES, packed_batch, packed_rows, tiny_config, trainer_for  # noqa: E402

repo_root = Path(__file__).parent.parent
trainer = trainer_for(tiny_config(repo_root), MESHES["data2_expert2_tensor2"])
batch = packed_batch()
rows = process_rows(batch.input_ids.shape[0], trainer.batch_sharding)
# Only this process's rows are loaded, through the pipeline as train.py reads them.
tokens, segments = packed_rows()
data = batch_dataset(InMemoryRows(tokens, segments), len(tokens), seed=0, held_rows=rows,
                     shuffle=False)
local = next(iter(data))
state, metrics = trainer.step(trainer.init(), global_batch(local, trainer.batch_sharding,
                                                           batch.input_ids.shape[0]))
params = multihost_utils.process_allgather(state.params, tiled=True)
if jax.process_index() == 0:
    leaves = {jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_leaves_with_path(params)}
    metric_values = {f"metric/{k}": np.asarray(v) for k, v in metrics.items()}
    np.savez(sys.argv[1], **leaves, **metric_values, rows_per_process=len(rows))
