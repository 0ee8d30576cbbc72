"""Checkpoints (orbax): the train state and the data-iterator position, saved asynchronously and
atomically every N steps, keeping the last K.

Orbax writes each step into a temporary folder and renames it when complete, so a save cut
short (a crash, a kill) leaves only a temporary folder, which `latest_step` never returns.
Restoring takes the abstract state with its shardings: every array is read straight into its
shard on its devices, never as one full host copy.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from qnext_jax.config import ConfigError

STATE, DATA = "state", "data"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be restored: corrupted, or not this model's."""


class Checkpoints:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).expanduser().absolute()  # orbax takes absolute paths
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True,  # half-written saves of a killed run are removed
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> None:
        """Starts the save (returns before the bytes are written when async)."""
        self.manager.save(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state),
        }), force=force)

    def restore(self, step: int, abstract_state):
        """-> (state placed by the shardings of `abstract_state`, data-iterator state)."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(target), DATA: ocp.args.JsonRestore(),
            }))
        except Exception as error:  # orbax raises many types; the user needs the path and why
            raise CheckpointError(
                f"cannot restore checkpoint step {step} from {self.directory / str(step)}: "
                f"{type(error).__name__}: {str(error)[:500]}"
            ) from error
        return restored[STATE], restored[DATA]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
