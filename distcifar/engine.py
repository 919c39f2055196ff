"""What a training run is made of and how it steps: one construction path (build_training, shared by train.py
and the benchmark), the optimizer-step generator that both drive, and evaluation."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from distcifar.config import Config, OptimConfig
from distcifar.data import Split, TrainBatches, normalize, tta_views
from distcifar.errors import DIVERGED_HINT, ConfigError, TrainingDiverged
from distcifar.hardware import wait_for_device
from distcifar.model import DistCifarNet, memory_format, uncompiled
from distcifar.optim import build_optimizer, build_scheduler
from distcifar.ranks import fail_together, max_over_ranks, rank_weight_spread
from distcifar.state import RunState, StepReport
from distcifar.utilization import Compute, for_run, peak_memory_gb


@dataclass
class Training:
    """What build_training prepares for one run."""

    model: torch.nn.Module  # prepared (DDP-wrapped on several processes), maybe compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped once per optimizer step, never prepared
    batches: TrainBatches
    total_steps: int  # of the whole run: epochs x steps per epoch, or train.max_steps
    eval_loader: torch.utils.data.DataLoader  # prepared: each rank evaluates its shard
    compute: Compute  # FLOPs per image and the hardware's peak: train/tflops, train/mfu
    ema: AveragedModel | None = None  # train.ema_decay: the moving average of the weights and BatchNorm statistics

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """The network that evaluations, keep_best, the target stop and final/ use: the average when there is one."""
        return self.ema.module if self.ema is not None else self.model


def _eval_loader(cfg: Config, split: Split) -> torch.utils.data.DataLoader:
    dataset = torch.utils.data.TensorDataset(split.images, split.labels)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.train.eval_batch_size)


def prepare_for_evaluation(cfg: Config, accelerator, model: torch.nn.Module, split: Split):
    """(model, eval loader), prepared: evaluate.py's half of build_training."""
    model = model.to(memory_format=memory_format(cfg.train.channels_last))
    return accelerator.prepare(model, _eval_loader(cfg, split))


def build_training(cfg: Config, accelerator, train: Split, evaluation: Split) -> Training:
    """The seed network (cfg.model), its optimizer, schedule, batches and eval loader, prepared; its FLOPs per image
    and the hardware's peak (on a CPU measured now, by every process at once)."""
    model = DistCifarNet(cfg.model)
    if cfg.train.sync_batchnorm and accelerator.num_processes > 1:
        if accelerator.device.type == "cpu":
            fail_together(
                accelerator,
                ConfigError,
                "train.sync_batchnorm needs GPUs (PyTorch's SyncBatchNorm refuses CPU tensors); "
                "set it false for a CPU run",
                same_on_every_rank=True,
            )
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(memory_format=memory_format(cfg.train.channels_last))
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
    model, optimizer, eval_loader = accelerator.prepare(model, optimizer, _eval_loader(cfg, evaluation))
    ema = None
    if cfg.train.ema_decay:
        # A copy of the network on its device, averaged after every optimizer step. use_buffers=True averages the
        # BatchNorm running statistics along with the weights (docs/recipes.md says why that is right enough, and
        # what it was measured against). No `device` argument: AveragedModel's counter then stays on the CPU, where
        # update_parameters reads it at every call without waiting for a GPU.
        ema = AveragedModel(
            accelerator.unwrap_model(model),
            multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay),
            use_buffers=True,
        )
    if cfg.train.compile:
        model = torch.compile(model)
    total_steps = min(total_steps, cfg.train.max_steps or total_steps)
    return Training(model, optimizer, scheduler, batches, total_steps, eval_loader, for_run(cfg, accelerator), ema)


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


class _LogWindow:
    """The steps since the last log line: their summed loss, kept on the device (never read back between log
    lines), and the training seconds when the window opened."""

    def __init__(self, device: torch.device, train_seconds: float):
        self.loss_sum = torch.zeros((), device=device)
        self.steps, self.opened = 0, train_seconds

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.steps += 1

    def mean_loss(self, accelerator, step: int) -> float:
        """The window's mean train loss over all ranks (a host sync); TrainingDiverged if it is not finite."""
        loss = accelerator.reduce(self.loss_sum, "mean").item() / self.steps
        if not math.isfinite(loss):  # the same value on every rank: all stop, the main process says why
            message = f"training diverged at step {step}: the train loss is {loss}; {DIVERGED_HINT}"
            fail_together(accelerator, TrainingDiverged, message, same_on_every_rank=True)
        return loss

    def reopen(self, train_seconds: float) -> None:
        self.loss_sum.zero_()
        self.steps, self.opened = 0, train_seconds


def optimizer_steps(
    accelerator,
    training: Training,
    cfg: Config,
    state: RunState,
    *,
    tracker,
    stop,
    checkpoints,
    until: int | None = None,
) -> Iterator[StepReport]:
    """Take optimizer steps from `state.step` to `until` (default: the run's end), advancing `state`
    and logging every train.log_every steps; yield a StepReport after each step. `stop` is the
    process's StopRequest (None: nothing to stop for, as in the benchmark).

    Host syncs happen only on logging steps, at epoch ends and, every `check_every` steps, where the
    ranks agree on stopping and on the checkpoint timer (on a CPU every step: there is no queue to
    drain). state.train_seconds counts the time spent in here, not what the driver does between steps
    (evaluate, save); it is read after a sync, so on a GPU it counts work done, not work queued.

    Longer than most functions here on purpose: it is the training loop, and every host sync in it should be
    visible in one read, top to bottom."""
    model, scheduler, batches, ema = training.model, training.scheduler, training.batches, training.ema
    # the network the average follows: the training weights inside any DDP or torch.compile wrapper
    trained = accelerator.unwrap_model(model, keep_torch_compile=False) if ema is not None else None
    until = training.total_steps if until is None else until
    check_every = 1 if accelerator.device.type == "cpu" else 10
    started, wall_before = time.monotonic(), state.wall_seconds
    window, epoch_started = _LogWindow(accelerator.device, state.train_seconds), state.train_seconds
    model.train()
    resumed = time.monotonic()  # when the driver last handed control back
    while state.step < until:
        logging_step = (state.step + 1) % cfg.train.log_every == 0
        micro_batches = batches.at_step(state.step)
        loss, grad_norm = train_step(accelerator, model, training.optimizer, micro_batches, cfg.optim, logging_step)
        if ema is not None:
            ema.update_parameters(trained)
        window.add(loss)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        state.step += 1
        epoch_end = state.step % batches.steps_per_epoch == 0
        report = StepReport()
        if logging_step:  # reading the loss waits for the step, so the clock below counts work done
            report.metrics = _step_metrics(
                accelerator, model, window, state.step, batches.steps_per_epoch, lr, grad_norm
            )
        elif epoch_end:
            wait_for_device(accelerator.device)
        if state.step % check_every == 0:
            signum, due = max_over_ranks(accelerator, stop.signum if stop else 0, checkpoints.timer_expired())
            report.stop_signal, report.save_timer_due = int(signum), bool(due)
        now = time.monotonic()
        state.train_seconds += now - resumed
        state.wall_seconds = wall_before + now - started
        if logging_step:
            images_per_second = window.steps * cfg.train.batch_size / (state.train_seconds - window.opened)
            report.metrics.update(_rates(images_per_second, accelerator.num_processes, training.compute))
            tracker.log(report.metrics, step=state.step)
            window.reopen(state.train_seconds)
        if epoch_end:  # the peak memory is the allocator's (or the kernel's) count: reading it waits for nothing
            report.peak_memory_gb = max_over_ranks(accelerator, peak_memory_gb(accelerator.device))[0]
            epoch_row = {
                "train/epoch_seconds": state.train_seconds - epoch_started,
                "train/epoch": state.step / batches.steps_per_epoch,
                "system/peak_memory_gb": report.peak_memory_gb,
            }
            tracker.log(epoch_row, step=state.step)
            epoch_started = state.train_seconds
        yield report
        resumed = time.monotonic()


def _rates(images_per_second: float, processes: int, compute: Compute) -> dict:
    """The throughput figures of a log row: images/s (all processes, and per process), TFLOP/s achieved (all
    processes) and, where the peak is known, the utilisation of it."""
    rates = {
        "train/images_per_second": images_per_second,
        "train/images_per_second_per_process": images_per_second / processes,
        "train/tflops": compute.tflops(images_per_second),
    }
    if compute.peak_tflops:
        rates["train/mfu"] = compute.utilization(images_per_second)
    return rates


def _step_metrics(
    accelerator, model, window: _LogWindow, step: int, steps_per_epoch: int, lr: float, grad_norm
) -> dict:
    """The log row of a logging step, but for its rates (which need the clock read after this sync)."""
    metrics = {
        "train/epoch": step / steps_per_epoch,
        "train/loss": window.mean_loss(accelerator, step),
        "train/lr": lr,
        "train/grad_norm": float(grad_norm),
    }
    if accelerator.num_processes > 1:  # DDP keeps ranks identical; check it rather than assume it
        metrics["train/rank_weight_max_diff"] = rank_weight_spread(accelerator, model)
    return metrics


@torch.no_grad()
def evaluate(
    accelerator,
    model,
    loader,
    *,
    num_classes: int,
    hflip: bool = False,
    translate: bool = False,
    layout: torch.memory_format = torch.contiguous_format,
) -> dict:
    """Accuracy, loss, per-class accuracy and confusion matrix; every image counted exactly once. With `hflip` or
    `translate` the logits are the mean of those of the image's test-time views (data.tta_views)."""
    model = uncompiled(model)  # torch.compile is for training: here it would recompile
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for images, labels in loader:
        views = tta_views(images, hflip, translate)
        with accelerator.autocast():
            logits = sum(model(normalize(view).contiguous(memory_format=layout)).float() for view in views)
        logits = logits / len(views)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        predictions = labels * num_classes + logits.argmax(1)
        confusion += torch.bincount(predictions, minlength=num_classes**2).view(num_classes, -1)
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
