"""Checkpoints: exact round trip onto the shardings, keep-last-K, an interrupted save ignored,
a corrupted one reported with its path."""

import shutil

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT
from qnext_jax.train.checkpoint import CheckpointError, Checkpoints
from qnext_jax.train.step import abstract_state
from step_setup import MESHES, tiny_config, trainer_for


@pytest.fixture(scope="module")
def trainer_and_state():
    trainer = trainer_for(tiny_config(REPO_ROOT), MESHES["fsdp4_expert2"])
    return trainer, trainer.init()


def test_round_trip_onto_shardings_and_keep_last(trainer_and_state, tmp_path):
    trainer, state = trainer_and_state
    checkpoints = Checkpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpoints.save(step, state, {"next_index": step * 10})
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 3] and checkpoints.latest_step() == 3
    restored, data = checkpoints.restore(3, abstract_state(trainer))
    assert data == {"next_index": 30}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(got, want)
        assert got.sharding == want.sharding
    checkpoints.close()


def test_interrupted_save_is_ignored_and_corruption_is_reported(trainer_and_state, tmp_path):
    trainer, state = trainer_and_state
    checkpoints = Checkpoints(tmp_path, keep=3)
    checkpoints.save(5, state, {"next_index": 1})
    checkpoints.close()
    # What a save killed half-way leaves: a temporary folder, never renamed to its step.
    shutil.copytree(tmp_path / "5", tmp_path / "9.orbax-checkpoint-tmp-1234")
    reopened = Checkpoints(tmp_path, keep=3)
    assert reopened.latest_step() == 5
    _, data = reopened.restore(5, abstract_state(trainer))
    assert data == {"next_index": 1}

    for path in (tmp_path / "5" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 1000:
            path.write_bytes(b"\0" * 100)  # truncated and zeroed array data
    with pytest.raises(CheckpointError, match=r"cannot restore checkpoint step 5 from .*5"):
        reopened.restore(5, abstract_state(trainer))
    reopened.close()
