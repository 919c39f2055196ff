"""The small records a run passes around: what a checkpoint carries besides tensors, and what one step reports."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunState:
    """Everything a resumed run needs besides the weights, optimizer and RNG; epoch and position
    in the epoch follow from `step` (TrainBatches.at_step)."""

    step: int = 0  # optimizer steps done
    wall_seconds: float = 0.0  # the loop's wall time over all attempts, evaluations and saves included
    train_seconds: float = 0.0  # time spent taking optimizer steps over all attempts (no evaluations, no saves)
    best_accuracy: float | None = None
    tracker_run_id: str | None = None
    target_accuracy: float | None = None  # the train.stop_at_accuracy that target_step and target_train_seconds are of
    target_step: int | None = None  # the step whose evaluation first reached it
    target_train_seconds: float | None = None  # train_seconds at that step: the run's own time to the target


@dataclass
class StepReport:
    """What one optimizer step leaves for its driver to act on."""

    metrics: dict | None = None  # on logging steps: the row just logged
    stop_signal: int = 0  # a SIGTERM/SIGINT/SIGUSR1 on any rank, agreed by all
    save_timer_due: bool = False  # checkpoint.every_minutes has passed on some rank, agreed by all
    peak_memory_gb: float | None = None  # at epoch ends: the most memory any process has held so far
    target_reached: bool = False  # set by the driver: this step's evaluation reached train.stop_at_accuracy on all
