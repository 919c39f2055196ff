"""Train the seed CIFAR-10 network with Hugging Face Accelerate.

    accelerate launch distcifar/train.py --config configs/smoke.yaml [--section.field VALUE ...]
    python distcifar/train.py --config configs/smoke.yaml          # one process

The same script runs on CPU, one GPU, several GPUs, several nodes and under SLURM. It resumes
from the newest checkpoint in --output_dir by default, and on SIGTERM, SIGINT or SIGUSR1 it saves
a checkpoint at the next optimizer step and exits.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch distcifar/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from distcifar import tracking
from distcifar.checkpoint import Checkpointer, CheckpointError
from distcifar.config import Config, ConfigError, OptimConfig, load_config
from distcifar.data import DataError, Split, TrainBatches, load_splits, normalize
from distcifar.model import DistCifarNet
from distcifar.optim import build_optimizer, build_scheduler


def print_once(*args) -> None:
    """Print on the main process only (accelerator.print prints once per node)."""
    if PartialState().is_main_process:
        print(*args, flush=True)


def usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def build_accelerator(cfg: Config) -> Accelerator:
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        usage_error(
            f"srun started {os.environ['SLURM_STEP_NUM_TASKS']} tasks of train.py without a launcher; refusing to "
            "train unsynchronised copies. Use `sbatch slurm/train.sh` (one accelerate launch per node)."
        )
    # ACCELERATE_USE_CPU: launch/cpu.yaml (or --cpu) on a machine that has GPUs.
    on_gpu = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    precision = cfg.train.mixed_precision
    if precision == "auto":  # bf16 where the hardware has it; emulated bf16 on CPU is ~10x slower than fp32
        if on_gpu:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    if precision == "fp16" and not on_gpu:
        usage_error("train.mixed_precision fp16 needs a GPU (Accelerate ignores it on CPU); use bf16 or no")
    report_to = tracking.report_to(cfg.tracking)
    accelerator = Accelerator(
        # Without cpu=True a multi-process launch on a machine with no GPU trains N unsynchronised copies.
        cpu=not on_gpu,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=None if report_to == "none" else [report_to],
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "tensorboard")),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        usage_error(
            f"the launcher started {launched} processes but Accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}); refusing to train unsynchronised copies. On CPU use "
            "`accelerate launch --config_file launch/cpu_multi.yaml` or torchrun."
        )
    return accelerator


@torch.no_grad()
def evaluate(model, loader, accelerator, num_classes: int, memory_format=torch.channels_last) -> dict:
    """Accuracy, loss, per-class accuracy and confusion matrix; every image counted exactly once."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(normalize(images).contiguous(memory_format=memory_format))
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2).view(num_classes, -1)
    model.train()
    confusion = confusion.cpu()
    samples = int(confusion.sum())
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return {
        "eval_accuracy": confusion.diag().sum().item() / samples,
        "eval_loss": loss_sum.item() / samples,
        "eval_samples": samples,
        "per_class_accuracy": per_class,
        "confusion": confusion.tolist(),
    }


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


class StopRequest:
    """Remembers a SIGTERM/SIGINT/SIGUSR1 so training can checkpoint at the next step boundary."""

    def __init__(self):
        self.signum = 0
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        # Ctrl-C under a launcher delivers SIGINT and then the launcher's SIGTERM: keep the first,
        # never raise, so the checkpoint is written; the launcher kills us if we take too long.
        self.signum = self.signum or signum


def agree(accelerator, *flags: float) -> list[float]:
    """The max of each flag over all ranks, so every rank takes the same decision."""
    values = torch.tensor(flags, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        usage_error(str(err))
    accelerator = build_accelerator(cfg)
    out = Path(cfg.output_dir)
    stop = StopRequest()
    set_seed(cfg.train.seed)

    try:
        with accelerator.main_process_first():
            train_split, eval_split, eval_name = load_splits(cfg.data, cfg.model.num_classes)
    except DataError as err:
        usage_error(str(err))

    model = DistCifarNet(cfg.model)
    if cfg.train.sync_batchnorm and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    world, rank = accelerator.num_processes, accelerator.process_index
    try:
        batches = TrainBatches(train_split, cfg.data, batch_size=cfg.train.batch_size,
                               grad_accum_steps=cfg.train.grad_accum_steps, rank=rank, world_size=world,
                               seed=cfg.train.seed, device=accelerator.device, channels_last=cfg.train.channels_last)
    except DataError as err:
        usage_error(str(err))
    steps_per_epoch = batches.steps_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, total_steps)
    eval_loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(eval_split.images, eval_split.labels), batch_size=cfg.train.eval_batch_size
    )
    model, optimizer, eval_loader = accelerator.prepare(model, optimizer, eval_loader)
    if cfg.train.compile:
        model = torch.compile(model)
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # each rank its own dropout stream

    # Resume -------------------------------------------------------------------------------
    checkpoints = Checkpointer(accelerator, out / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.keep_best)
    resume_from = None
    if cfg.resume == "auto":
        resume_from = checkpoints.latest()
    elif cfg.resume != "never":
        resume_from = Path(cfg.resume)
        if not resume_from.is_dir():
            usage_error(f"--resume {cfg.resume}: no such checkpoint folder (or use auto / never)")
    trainer = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "wall_seconds": 0.0, "best_accuracy": None}
    run_id = None
    if resume_from is not None:
        try:
            saved = checkpoints.load(resume_from, model=model, config=cfg.to_dict(),
                                     optimizer=None if cfg.checkpoint.weights_only else optimizer,
                                     scheduler=scheduler)
        except CheckpointError as err:
            usage_error(str(err))
        if not cfg.checkpoint.weights_only:
            trainer.update({k: saved[k] for k in trainer})
            run_id = saved.get("tracker_run_id")
        weights_only = " (weights only)" if cfg.checkpoint.weights_only else ""
        print_once(f"resumed from {resume_from} at step {saved['global_step']}{weights_only}")

    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    hardware = {"device": str(accelerator.device), "num_processes": world,
                "mixed_precision": accelerator.mixed_precision, "distributed_type": str(accelerator.distributed_type),
                "device_name": torch.cuda.get_device_name() if accelerator.device.type == "cuda" else "cpu"}
    tracker = tracking.Tracker(accelerator, cfg, out, run_id, hardware)
    sample = Split(eval_split.images[:32], eval_split.labels[:32])
    print_once(
        f"{len(train_split)} train / {len(eval_split)} {eval_name} images | {world} process(es) on "
        f"{accelerator.device} ({accelerator.distributed_type}), {accelerator.mixed_precision} | global batch "
        f"{cfg.train.batch_size} = {batches.micro_batch} per device x {world} processes x "
        f"{cfg.train.grad_accum_steps} accumulation steps | {steps_per_epoch} steps/epoch, {total_steps} total"
    )

    # Train --------------------------------------------------------------------------------
    def save(state_epoch: int, step_in_epoch: int, eval_accuracy=None):
        trainer.update(epoch=state_epoch, step_in_epoch=step_in_epoch, wall_seconds=wall())
        checkpoints.save(step=trainer["global_step"], model=model, optimizer=optimizer, scheduler=scheduler,
                         eval_accuracy=eval_accuracy,
                         state=dict(trainer, world_size=world, config=cfg.to_dict(), tracker_run_id=tracker.run_id))
        last_save["step"], last_save["time"] = trainer["global_step"], time.monotonic()

    started, wall_before, steps_before = time.monotonic(), trainer["wall_seconds"], trainer["global_step"]
    wall = lambda: wall_before + time.monotonic() - started  # noqa: E731
    last_save = {"step": trainer["global_step"], "time": time.monotonic()}
    max_steps = min(total_steps, cfg.train.max_steps or total_steps)
    check_every = 1 if accelerator.device.type == "cpu" else 10  # stop/timer agreement costs a host sync
    model.train()
    loss_sum = torch.zeros((), device=accelerator.device)
    window = {"images": 0, "time": time.perf_counter(), "steps": 0}
    result, exit_signal = None, 0
    # A live bar in a terminal; in a log file (SLURM, CI) plain log lines instead of carriage returns.
    interactive = sys.stderr.isatty()
    progress = tqdm(total=max_steps, initial=trainer["global_step"], desc="train", dynamic_ncols=True,
                    disable=not (accelerator.is_main_process and interactive))
    epoch = trainer["epoch"]
    while epoch < cfg.train.epochs and trainer["global_step"] < max_steps and not exit_signal:
        epoch_started = time.perf_counter()
        for step, micro_batches in batches.epoch(epoch, start_step=trainer["step_in_epoch"]):
            logging_step = (trainer["global_step"] + 1) % cfg.train.log_every == 0
            loss, grad_norm = train_step(accelerator, model, optimizer, micro_batches, cfg.optim, logging_step)
            loss_sum += loss
            # One optimizer step done.
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            trainer["global_step"] += 1
            trainer["step_in_epoch"] = step + 1
            window["images"] += cfg.train.batch_size
            window["steps"] += 1
            progress.update(1)
            global_step = trainer["global_step"]
            if logging_step:
                seconds = time.perf_counter() - window["time"]
                metrics = {
                    "epoch": epoch + (step + 1) / steps_per_epoch,
                    "train_loss": accelerator.reduce(loss_sum, "mean").item() / window["steps"],
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "images_per_second": window["images"] / seconds,
                    "images_per_second_per_process": window["images"] / seconds / world,
                }
                if world > 1:  # DDP keeps ranks identical; check it rather than assume it
                    checksum = sum(p.detach().double().sum() for p in model.parameters())
                    sums = accelerator.gather(checksum[None])
                    metrics["rank_weight_max_diff"] = (sums.max() - sums.min()).item()
                tracker.log(metrics, step=global_step)
                progress.set_postfix(loss=f"{metrics['train_loss']:.3f}", lr=f"{metrics['lr']:.2e}")
                if not interactive:
                    print_once(f"step {global_step}/{max_steps} epoch {metrics['epoch']:.2f} loss "
                                      f"{metrics['train_loss']:.4f} lr {metrics['lr']:.3e} {metrics['images_per_second']:.0f} images/s")
                loss_sum.zero_()
                window.update(images=0, time=time.perf_counter(), steps=0)
            end_of_epoch = step + 1 == steps_per_epoch
            if global_step % check_every == 0 or end_of_epoch or global_step >= max_steps:
                minutes = cfg.checkpoint.every_minutes
                due = minutes > 0 and time.monotonic() - last_save["time"] >= minutes * 60
                exit_signal, due = (int(v) for v in agree(accelerator, stop.signum, due))
                periodic = cfg.checkpoint.every_steps and global_step % cfg.checkpoint.every_steps == 0
                if exit_signal or ((periodic or due) and not end_of_epoch):
                    save(epoch, step + 1)
                if exit_signal or global_step >= max_steps:
                    break
        if exit_signal:
            break
        finished_epoch = trainer["step_in_epoch"] == steps_per_epoch
        if finished_epoch:
            epoch += 1
            trainer["step_in_epoch"] = 0
            tracker.log({"epoch_seconds": time.perf_counter() - epoch_started, "epoch": epoch}, step=trainer["global_step"])
        last = epoch >= cfg.train.epochs or trainer["global_step"] >= max_steps
        if last or (finished_epoch and epoch % cfg.train.eval_every_epochs == 0):
            result = evaluate(model, eval_loader, accelerator, cfg.model.num_classes, batches.memory_format)
            result.update(epoch=epoch + trainer["step_in_epoch"] / steps_per_epoch, eval_split=eval_name)
            best = trainer["best_accuracy"]
            trainer["best_accuracy"] = max(best or 0.0, result["eval_accuracy"])
            tracker.log_eval(result, step=trainer["global_step"], model=accelerator.unwrap_model(model, keep_torch_compile=False),
                             sample_images=sample.images, sample_labels=sample.labels)
            print_once(f"epoch {result['epoch']:g}: {eval_name} accuracy {result['eval_accuracy']:.4f}, loss {result['eval_loss']:.4f}")
        if last_save["step"] != trainer["global_step"] and (finished_epoch or last):
            save(epoch, trainer["step_in_epoch"], eval_accuracy=result["eval_accuracy"] if result else None)
    progress.close()

    if exit_signal:
        print_once(f"stopped by signal {exit_signal} at step {trainer['global_step']}; checkpoint saved, resume with the same command")
        tracker.finish(exit_code=128 + exit_signal)
        accelerator.end_training()
        sys.exit(128 + exit_signal)

    if result is None:  # resumed from a finished run: nothing trained, evaluate once
        result = evaluate(model, eval_loader, accelerator, cfg.model.num_classes, batches.memory_format)
    summary = {
        "test_accuracy": result["eval_accuracy"],
        "test_loss": result["eval_loss"],
        "eval_samples": result["eval_samples"],
        "eval_split": eval_name,
        "per_class_accuracy": result["per_class_accuracy"],
        "global_step": trainer["global_step"],
        "epochs": trainer["global_step"] / steps_per_epoch,
        "images_per_second": (trainer["global_step"] - steps_before) * cfg.train.batch_size / (wall() - wall_before),
        "wall_seconds": wall(),
        "num_processes": world,
        "mixed_precision": accelerator.mixed_precision,
        "global_batch_size": cfg.train.batch_size,
        "tracker_run_id": tracker.run_id,
    }
    if accelerator.is_main_process:
        accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(out / "final", config=cfg.model)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: v for k, v in summary.items() if k != "per_class_accuracy"}))
    tracker.finish(summary)
    accelerator.end_training()


if __name__ == "__main__":
    main()
