"""What a run is made of and how it steps: one construction path, the run state, the optimizer-step
generator that train.py and benchmark.py both drive, and evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distcifar.cli import RunFailed
from distcifar.config import Config, ConfigError, OptimConfig
from distcifar.data import Split, TrainBatches, normalize
from distcifar.model import DistCifarNet
from distcifar.optim import build_optimizer, build_scheduler
from distcifar.runtime import agree


class TrainingDiverged(RunFailed):
    """The loss or the weights are no longer finite."""


DIVERGED_HINT = "lower optim.lr or set optim.grad_clip (e.g. 1.0), then start again or resume from a checkpoint"


def check_finite(model: torch.nn.Module, step: int) -> None:
    """Raise TrainingDiverged if any weight or buffer is NaN or infinite (one host sync)."""
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not torch.stack([t.isfinite().all() for t in floats]).all():
        raise TrainingDiverged(
            f"training diverged by step {step}: the weights hold NaN or infinite values; {DIVERGED_HINT}"
        )


def wait_for_device(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read next counts work done rather than work queued."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def rank_weight_spread(accelerator, model: torch.nn.Module) -> float:
    """max - min over ranks of the sum of every weight: 0.0 while DDP keeps the ranks identical (one gather)."""
    checksum = sum(p.detach().double().sum() for p in model.parameters())
    sums = accelerator.gather(checksum[None])
    return (sums.max() - sums.min()).item()


@dataclass
class RunState:
    """Everything a resumed run needs besides the weights, optimizer and RNG; epoch and position
    in the epoch follow from `step` (TrainBatches.at_step)."""

    step: int = 0  # optimizer steps done
    wall_seconds: float = 0.0  # the loop's wall time over all attempts, evaluations and saves included
    train_seconds: float = 0.0  # time spent taking optimizer steps over all attempts (no evaluations, no saves)
    best_accuracy: float | None = None
    tracker_run_id: str | None = None


@dataclass
class Parts:
    model: torch.nn.Module  # prepared (DDP-wrapped on several processes), maybe compiled
    eval_loader: torch.utils.data.DataLoader
    memory_format: torch.memory_format
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None  # stepped once per optimizer step, never prepared
    batches: TrainBatches | None = None
    total_steps: int = 0  # of the whole run: epochs x steps per epoch, or train.max_steps


def build(
    cfg: Config, accelerator, evaluation: Split, train: Split | None = None, model: torch.nn.Module | None = None
) -> Parts:
    """Model, eval loader and, given a training split, optimizer, scheduler and batches, prepared."""
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model if model is not None else DistCifarNet(cfg.model)
    if cfg.train.sync_batchnorm and accelerator.num_processes > 1:
        if accelerator.device.type == "cpu":
            raise ConfigError(
                "train.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm refuses CPU tensors); "
                "set it false for a CPU run"
                if accelerator.is_main_process
                else ""
            )
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(memory_format=memory_format)
    eval_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(evaluation.images, evaluation.labels), batch_size=cfg.train.eval_batch_size
    )
    if train is None:
        model, eval_loader = accelerator.prepare(model, eval_loader)
        return Parts(model, eval_loader, memory_format)
    batches = TrainBatches(
        train,
        cfg.data,
        batch_size=cfg.train.batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=cfg.train.seed,
        device=accelerator.device,
        channels_last=cfg.train.channels_last,
    )
    total_steps = cfg.train.epochs * batches.steps_per_epoch
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, batches.steps_per_epoch, total_steps)
    model, optimizer, eval_loader = accelerator.prepare(model, optimizer, eval_loader)
    if cfg.train.compile:
        model = torch.compile(model)
    return Parts(
        model,
        eval_loader,
        memory_format,
        optimizer,
        scheduler,
        batches,
        min(total_steps, cfg.train.max_steps or total_steps),
    )


def train_step(accelerator, model, optimizer, micro_batches, cfg: OptimConfig, want_grad_norm: bool):
    """One optimizer step over this rank's micro-batches: (mean loss, grad norm or None), no host sync."""
    loss_sum, grad_norm = 0.0, None
    for images, labels in micro_batches:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss = F.cross_entropy(model(images), labels, label_smoothing=cfg.label_smoothing)
            accelerator.backward(loss)
            loss_sum = loss_sum + loss.detach()
            if accelerator.sync_gradients and (cfg.grad_clip or want_grad_norm):
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return loss_sum / accelerator.gradient_accumulation_steps, grad_norm


@dataclass
class StepReport:
    """What one optimizer step leaves for its driver to act on."""

    metrics: dict | None = None  # on logging steps: the row just logged
    stop_signal: int = 0  # a SIGTERM/SIGINT/SIGUSR1 on any rank, agreed by all
    timer_due: bool = False  # checkpoint.every_minutes has passed on some rank, agreed by all


def optimizer_steps(
    accelerator, parts: Parts, cfg: Config, state: RunState, *, tracker, stop, checkpoints, until: int | None = None
) -> Iterator[StepReport]:
    """Take optimizer steps from `state.step` to `until` (default: the run's end), advancing `state`
    and logging every train.log_every steps; yield a StepReport after each step. `stop` is the
    process's StopRequest (None: nothing to stop for, as in the benchmark).

    Host syncs happen only on logging steps, at epoch ends and, every `check_every` steps, where the
    ranks agree on stopping and on the checkpoint timer (on a CPU every step: there is no queue to
    drain). state.train_seconds counts the time spent in here, not what the driver does between steps
    (evaluate, save); it is read after a sync, so on a GPU it counts work done, not work queued."""
    model, optimizer, scheduler, batches = parts.model, parts.optimizer, parts.scheduler, parts.batches
    until = parts.total_steps if until is None else until
    check_every = 1 if accelerator.device.type == "cpu" else 10
    steps_per_epoch, world = batches.steps_per_epoch, accelerator.num_processes
    started, wall_before = time.monotonic(), state.wall_seconds
    loss_sum = torch.zeros((), device=accelerator.device)
    window_steps, window_started, epoch_started = 0, state.train_seconds, state.train_seconds
    model.train()
    resumed = time.monotonic()  # when the driver last handed control back
    while state.step < until:
        logging_step = (state.step + 1) % cfg.train.log_every == 0
        loss, grad_norm = train_step(
            accelerator, model, optimizer, batches.at_step(state.step), cfg.optim, logging_step
        )
        loss_sum += loss
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        state.step += 1
        window_steps += 1
        epoch_end = state.step % steps_per_epoch == 0
        report = StepReport()
        if logging_step:  # reading the loss waits for the step, so the clock below counts work done
            train_loss = accelerator.reduce(loss_sum, "mean").item() / window_steps
            if not math.isfinite(train_loss):  # the same value on every rank: all stop
                raise TrainingDiverged(
                    f"training diverged at step {state.step}: the train loss is {train_loss}; {DIVERGED_HINT}"
                )
            report.metrics = {
                "train/epoch": state.step / steps_per_epoch,
                "train/loss": train_loss,
                "train/lr": lr,
                "train/grad_norm": float(grad_norm),
            }
            if world > 1:  # DDP keeps ranks identical; check it rather than assume it
                report.metrics["train/rank_weight_max_diff"] = rank_weight_spread(accelerator, model)
        elif epoch_end:
            wait_for_device(accelerator.device)
        if state.step % check_every == 0:
            signum, due = agree(accelerator, stop.signum if stop else 0, checkpoints.timer_expired())
            report.stop_signal, report.timer_due = int(signum), bool(due)
        now = time.monotonic()
        state.train_seconds += now - resumed
        state.wall_seconds = wall_before + now - started
        if logging_step:
            images_per_second = window_steps * cfg.train.batch_size / (state.train_seconds - window_started)
            report.metrics.update(
                {
                    "train/images_per_second": images_per_second,
                    "train/images_per_second_per_process": images_per_second / world,
                }
            )
            tracker.log(report.metrics, step=state.step)
            loss_sum.zero_()
            window_steps, window_started = 0, state.train_seconds
        if epoch_end:
            tracker.log(
                {
                    "train/epoch_seconds": state.train_seconds - epoch_started,
                    "train/epoch": state.step / steps_per_epoch,
                },
                step=state.step,
            )
            epoch_started = state.train_seconds
        yield report
        resumed = time.monotonic()


@torch.no_grad()
def evaluate(accelerator, parts: Parts, num_classes: int, hflip: bool = False) -> dict:
    """Accuracy, loss, per-class accuracy and confusion matrix; every image counted exactly once. With `hflip`
    the logits are the mean of the image's and its mirror image's (test-time augmentation)."""
    model = getattr(parts.model, "_orig_mod", parts.model)  # torch.compile is for training: here it would recompile
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for images, labels in parts.eval_loader:
        with accelerator.autocast():
            logits = model(normalize(images).contiguous(memory_format=parts.memory_format)).float()
            if hflip:
                mirrored = normalize(images.flip(3)).contiguous(memory_format=parts.memory_format)
                logits = (logits + model(mirrored).float()) / 2
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).view(
            num_classes, -1
        )
    model.train()
    confusion = confusion.cpu()
    samples = int(confusion.sum())
    return {
        "eval_accuracy": confusion.diag().sum().item() / samples,
        "eval_loss": loss_sum.item() / samples,
        "eval_samples": samples,
        "per_class_accuracy": (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist(),
        "confusion": confusion.tolist(),
    }
