"""When to stop for a preemption, agreed by every process of the run.

A scheduler preempts a job with SIGTERM, often to one host first, and gives it a grace period.
The run must save one checkpoint, at one step, on every process: a save is a collective, so a
process that enters it while another enters the next step hangs them both.

- One process: SIGTERM (and a first Ctrl-C) set a flag that the loop reads after each step.
- Several processes: JAX's preemption service (started by `jax.distributed.initialize`, its
  own SIGTERM handler on every process) tells every process of a notice to any of them, and
  `reached_preemption_sync_point(step)` becomes true on all of them at the same step. Ctrl-C
  is turned into a SIGTERM to go the same way.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    """`reached(step)`, called after every step on every process, says whether to save and stop."""

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self.requested: str | None = None  # the signal's name, one process only
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # Python takes signals in the main thread only; they keep their defaults
        if self.multi_process:
            # JAX's SIGTERM handler must stay; a Ctrl-C (every rank of srun/mpirun gets one)
            # becomes a SIGTERM, so that it too goes through the sync point.
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward)
        else:
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame):
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
        self.requested = signal.Signals(number).name

    def _forward(self, number, frame):
        os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested is not None

    @property
    def reason(self) -> str:
        return self.requested or "preemption notice"

    def restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}
