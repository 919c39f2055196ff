"""Which optimizer steps of a run log, evaluate, save and let the ranks agree on stopping: the one place a run's
rhythm is decided, as a function of the step alone, so a resumed run does each where an uninterrupted one does."""

from __future__ import annotations

import math
from dataclasses import dataclass

from distcifar.config import Config


@dataclass(frozen=True)
class Cadence:
    steps_per_epoch: int
    total_steps: int  # the run's last step
    log_every: int  # train.log_every
    eval_every_epochs: float  # train.eval_every_epochs, maybe fractional
    save_every: int  # checkpoint.every_steps (0: only at epoch ends and the last step)
    agree_every: int  # steps between the ranks' agreements on a stop signal and the checkpoint timer

    @classmethod
    def for_run(cls, cfg: Config, steps_per_epoch: int, total_steps: int, on_cpu: bool) -> Cadence:
        # On a GPU an agreement is a host sync that drains the queue of launched kernels: every 10 steps keeps the
        # queue full and a signal still waits under a second. A CPU has no queue to drain.
        agree_every = 1 if on_cpu else 10
        train, every = cfg.train, cfg.checkpoint.every_steps
        return cls(steps_per_epoch, total_steps, train.log_every, train.eval_every_epochs, every, agree_every)

    def epoch_end(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0

    def last(self, step: int) -> bool:
        return step == self.total_steps

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0

    def agrees(self, step: int) -> bool:
        return step % self.agree_every == 0

    def syncs(self, step: int) -> bool:
        """Whether the step ends with a host sync (a log row, an epoch's row, an agreement): there the training clock
        is read after the device's queued work is done."""
        return self.logs(step) or self.epoch_end(step) or self.agrees(step)

    def evaluates(self, step: int) -> bool:
        """At the optimizer step nearest each multiple of train.eval_every_epochs epochs, and after the last step."""
        every = self.eval_every_epochs * self.steps_per_epoch  # in steps, maybe fractional
        nearest = round(step / every)
        return self.last(step) or (nearest >= 1 and math.floor(nearest * every + 0.5) == step)

    def saves(self, step: int) -> bool:
        """At epoch ends, after the last step, and every checkpoint.every_steps steps (a stop signal, the checkpoint
        timer and a reached target save too: the driver adds those)."""
        every = self.save_every
        return self.epoch_end(step) or self.last(step) or bool(every and step % every == 0)
