"""The train step with rows split over `sequence`: one step at T = 1024 on packed rows whose
documents cross shard boundaries (and one that starts exactly on a shard edge) gives the loss
and updated parameters of one device, with MTP and the global load-balancing loss on."""

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT
from qnext_jax.data.batch import batch_from_packed_rows
from step_setup import MeshConfig, tiny_config, trainer_for
from test_train_step import assert_same_step, flat_params, run_step

LENGTH = 1024
SEQUENCE_MESHES = {
    "sequence8": MeshConfig(fsdp=1, sequence=8),
    "sequence4_expert2": MeshConfig(fsdp=1, expert=2, sequence=4),
    "data2_sequence2_tensor2": MeshConfig(data=2, fsdp=1, sequence=2, tensor=2),
}


def long_packed_batch():
    """Row 0: documents [0, 100), [100, 300), a 1-token one at 300, [301, 640), [640, 768)
    (starting on an edge of 8 and of 4 shards), [768, 1025); row 1: one document, padded."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, LENGTH + 1))
    segments = np.ones((2, LENGTH + 1), np.int32)
    for start, document in ((100, 2), (300, 3), (301, 4), (640, 5), (768, 6)):
        segments[0, start:] = document
    segments[1, LENGTH - 40:] = 0
    return batch_from_packed_rows(tokens, segments)


@pytest.fixture(scope="module")
def config():
    return tiny_config(REPO_ROOT)


@pytest.fixture(scope="module")
def single_device(config):
    _, state, metrics = run_step(config, MeshConfig(fsdp=1), long_packed_batch(), jax.devices()[:1])
    return metrics, flat_params(state.params)


@pytest.mark.parametrize("mesh_name", sorted(SEQUENCE_MESHES))
def test_sequence_sharded_step_equals_one_device(config, single_device, mesh_name):
    trainer = trainer_for(config, SEQUENCE_MESHES[mesh_name])
    batch = jax.device_put(long_packed_batch(), trainer.batch_sharding)
    assert batch.input_ids.sharding.spec[1] == "sequence"
    state, metrics = trainer.step(trainer.init(), batch)
    ref_metrics, ref_params = single_device
    assert ref_metrics["mtp_loss"] > 1.0 and ref_metrics["lbl_loss"] > 1.0
    assert_same_step({k: np.asarray(v) for k, v in metrics.items()}, flat_params(state.params),
                     ref_metrics, ref_params)
