"""What a training run is made of and how it steps: one construction path (build_training, shared by train.py
and the benchmark), the optimizer-step generator that both drive, and evaluation."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from distcifar.cadence import Cadence
from distcifar.config import Config, OptimConfig
from distcifar.data import Split, TrainBatches, normalize, tta_views
from distcifar.errors import DIVERGED_HINT, ConfigError, TrainingDiverged
from distcifar.hardware import wait_for_device
from distcifar.model import DistCifarNet, memory_format, uncompiled
from distcifar.optim import build_optimizer, build_scheduler
from distcifar.ranks import fail_together, max_over_ranks, rank_weight_spread
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
    cadence: Cadence  # which steps log, evaluate, save and agree on stopping
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
        layout=memory_format(cfg.train.channels_last),
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
    cadence = Cadence.for_run(cfg, batches.steps_per_epoch, total_steps, on_cpu=accelerator.device.type == "cpu")
    compute = for_run(cfg, accelerator)
    return Training(model, optimizer, scheduler, batches, total_steps, eval_loader, compute, cadence, ema)


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
class Progress:
    """How far the run has come over all its attempts: the engine's part of a checkpoint."""

    step: int = 0  # optimizer steps done
    train_seconds: float = 0.0  # time spent taking optimizer steps (no evaluations, no saves)
    wall_seconds: float = 0.0  # the loop's wall time, evaluations and saves included

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.train_seconds, self.wall_seconds = state.get("train_seconds", 0.0), state.get("wall_seconds", 0.0)


@dataclass(frozen=True)
class StepReport:
    """What one optimizer step leaves for its driver; never changed once yielded."""

    step: int
    rows: tuple[dict, ...] = ()  # to log at this step: the train row on logging steps, then the epoch's row at its end
    peak_memory_gb: float | None = None  # at epoch ends: the most memory any process has held so far

    @property
    def metrics(self) -> dict | None:
        """The train row of a logging step (loss, rate, throughput), else None."""
        return next((row for row in self.rows if "train/loss" in row), None)


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
    accelerator, training: Training, cfg: OptimConfig, progress: Progress, until: int | None = None
) -> Iterator[StepReport]:
    """Take optimizer steps from `progress.step` to `until` (default: the run's end), advancing `progress`; yield a
    StepReport after each, with the rows to log that training.cadence says are due.

    Host syncs happen only where the cadence says a step syncs (logging steps, epoch ends, the ranks' agreements
    on stopping), so the device's queue stays full in between. progress.train_seconds counts the time spent in
    here, not what the driver does between steps (log, evaluate, save); at a syncing step it is read after the
    device's work is done, so on a GPU it counts work done, not work queued.

    Longer than most functions here on purpose: it is the training loop, and every host sync in it should be
    visible in one read, top to bottom."""
    model, batches, ema, cadence = training.model, training.batches, training.ema, training.cadence
    # the network the average follows: the training weights inside any DDP or torch.compile wrapper
    trained = accelerator.unwrap_model(model, keep_torch_compile=False) if ema is not None else None
    until = training.total_steps if until is None else until
    started, wall_before = time.monotonic(), progress.wall_seconds
    window, epoch_started = _LogWindow(accelerator.device, progress.train_seconds), progress.train_seconds
    model.train()
    resumed = time.monotonic()  # when the driver last handed control back
    while progress.step < until:
        step = progress.step + 1
        loss, grad_norm = train_step(
            accelerator, model, training.optimizer, batches.at_step(progress.step), cfg, cadence.logs(step)
        )
        if ema is not None:
            ema.update_parameters(trained)
        window.add(loss)
        lr = training.scheduler.get_last_lr()[0]  # the rate this step used
        training.scheduler.step()
        progress.step = step
        rows = []
        if cadence.logs(step):  # reading the loss waits for the step, so the clock below counts work done
            rows.append(_step_metrics(accelerator, model, window, step, batches.steps_per_epoch, lr, grad_norm))
        elif cadence.syncs(step):
            wait_for_device(accelerator.device)
        now = time.monotonic()
        progress.train_seconds += now - resumed
        progress.wall_seconds = wall_before + now - started
        if cadence.logs(step):
            images_per_second = window.steps * batches.batch_size / (progress.train_seconds - window.opened)
            rates = training.compute.rates(images_per_second, accelerator.num_processes)
            rows[0].update({f"train/{name}": value for name, value in rates.items() if value is not None})
            window.reopen(progress.train_seconds)
        peak = None
        if cadence.epoch_end(step):  # the peak memory is the allocator's (or the kernel's) count: no wait
            peak = max_over_ranks(accelerator, peak_memory_gb(accelerator.device))[0]
            epoch_row = {
                "train/epoch_seconds": progress.train_seconds - epoch_started,
                "train/epoch": step / batches.steps_per_epoch,
                "system/peak_memory_gb": peak,
            }
            rows.append(epoch_row)
            epoch_started = progress.train_seconds
        yield StepReport(step, tuple(rows), peak)
        resumed = time.monotonic()


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
