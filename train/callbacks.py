"""The trainer's loop callbacks besides monitoring: when to checkpoint, when to stop.

A signal (SIGUSR1/SIGTERM from SLURM before a preemption or the time limit) sets a flag; ranks
agree on stopping at the logging interval (one tiny all-reduce), so a signal that reached only
some ranks still stops all of them at the same step.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import torch

from train.distributed import all_reduce_sum
from train.loop import Callback, StopTraining, TrainState

log = logging.getLogger("resnet")


class StopSignal:
    """SIGUSR1/SIGTERM set a flag instead of killing the process; installed first thing in fit()
    so that a signal arriving while the run starts up is not lost either."""

    def __init__(self):
        self.received = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        log.warning("received %s: will save a checkpoint and exit for requeue", signal.Signals(signum).name)
        self.received = True


class StopOnSignal(Callback):
    """Leave the loop at the first logging step after any rank got a signal."""

    def __init__(self, stop: StopSignal, *, every: int, device: torch.device):
        self.stop, self.every, self.device = stop, every, device

    def after_step(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            flag = torch.tensor([float(self.stop.received)], device=self.device)
            if all_reduce_sum(flag).item() > 0:
                raise StopTraining("signal")


class CheckpointCadence(Callback):
    """Save every `checkpoint.every_steps` steps and stop (after saving) at `train.max_steps`."""

    def __init__(self, *, every_steps: int, max_steps: int, save: Callable[[TrainState], None]):
        self.every, self.max_steps, self.save = every_steps, max_steps, save

    def flush_due(self, state: TrainState) -> bool:
        """A checkpoint follows this step: the loop checks the loss for NaN/inf first."""
        return bool(self.every and state.step % self.every == 0) or self._at_end(state)

    def _at_end(self, state: TrainState) -> bool:
        return bool(self.max_steps and state.step >= self.max_steps)

    def after_step(self, state: TrainState) -> None:
        if self.every and state.step % self.every == 0:
            self.save(state)
        if self._at_end(state):
            raise StopTraining("max_steps")


class WaitForStaging(Callback):
    """Before each forward: a background checkpoint must have copied the weights off first."""

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer

    def on_batch(self, state: TrainState, images: torch.Tensor) -> None:
        self.checkpointer.wait_staged()
