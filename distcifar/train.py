"""Train the seed CIFAR-10 network with Hugging Face Accelerate.

    accelerate launch distcifar/train.py --config configs/cpu.yaml [--section.field VALUE ...]
    python -m distcifar.train --config configs/smoke.yaml          # one process

The same script runs on CPU, one GPU, several GPUs, several nodes and under SLURM. It resumes
from the newest checkpoint in --output_dir by default, and on SIGTERM, SIGINT or SIGUSR1 it saves
a checkpoint at the next optimizer step and exits with 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch distcifar/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from distcifar import export, profiling, tracking
from distcifar.accelerator import build_accelerator
from distcifar.checkpoint import Checkpointer
from distcifar.config import Config, parse_config
from distcifar.data import load_splits
from distcifar.engine import Training, build_training, evaluate, optimizer_steps
from distcifar.errors import entry_point
from distcifar.hardware import cpu_threads, hardware
from distcifar.lock import OutputLock
from distcifar.model import memory_format
from distcifar.ranks import end_run, max_over_ranks, print_once, take_main_process_buffers
from distcifar.signals import StopRequest
from distcifar.state import RunState
from distcifar.utilization import peak_memory_gb

GPU_COMMAND = "accelerate launch --config_file launch/gpu.yaml distcifar/train.py --config configs/default.yaml"


@entry_point
def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(sys.argv[1:] if argv is None else argv, prog="distcifar-train", description=__doc__)
    export.check_push(cfg)  # --push_to_hub needs a token and the network: say so now, not after training
    accelerator = build_accelerator(cfg, log_with=tracking.report_to(cfg.tracking))
    OutputLock(cfg.output_dir).acquire(accelerator)  # one run per output folder
    stop = StopRequest()
    set_seed(cfg.train.seed)
    with accelerator.main_process_first():
        train_split, eval_split, eval_name = load_splits(cfg.data, cfg.model.num_classes)
    training = build_training(cfg, accelerator, train_split, eval_split)
    torch.manual_seed(cfg.train.seed * 1000 + accelerator.process_index)  # each rank its own dropout stream

    out = Path(cfg.output_dir)
    checkpoints = Checkpointer.for_run(accelerator, cfg, training)
    state = checkpoints.resume(cfg.resume)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tracker = tracking.Tracker(accelerator, cfg, out, state.tracker_run_id, hardware(accelerator), state.step)
    state.tracker_run_id = tracker.run_id
    print_once(
        f"{len(train_split)} train / {len(eval_split)} {eval_name} images | {run_line(cfg, accelerator, training)}\n"
        f"{training.compute.describe()} | {determinism_line(cfg, accelerator)}"
    )

    # Train: evaluate when due and at the end; the checkpointer decides when to save --------------
    start = dataclasses.replace(state)  # where this attempt starts: its own images/s
    evaluation = Evaluation(accelerator, cfg, training, tracker, eval_split.head(32), eval_name)
    result, exit_signal = None, 0
    until = state.step if evaluation.target_reached_before(state) else None  # then nothing is left to train
    progress = Progress(accelerator, training.total_steps, state.step)
    steps = optimizer_steps(
        accelerator, training, cfg, state, tracker=tracker, stop=stop, checkpoints=checkpoints, until=until
    )
    with contextlib.closing(profiling.profiled(steps, cfg, state, accelerator, out)) as steps:  # --train.profile_steps
        for report in steps:
            progress.show(report, state.step)
            eval_accuracy = None
            if evaluation.due(state.step):
                result = evaluation.run(state, peak_memory_gb=report.peak_memory_gb)
                eval_accuracy = result["eval_accuracy"]
                report.target_reached = evaluation.reached_target(result, state)
            checkpoints.save_if_due(report, eval_accuracy)
            if report.stop_signal:
                exit_signal = report.stop_signal
                break
            if report.target_reached:
                break
    progress.close()

    if exit_signal:
        print_once(
            f"stopped by signal {exit_signal} at step {state.step}; checkpoint saved, resume with the same command"
        )
        tracker.finish(exit_code=128 + exit_signal)
        end_run(accelerator, 128 + exit_signal)

    if result is None:  # resumed from a finished run (or one that reached its target): nothing trained, evaluate once
        result = evaluation.run(state, log=False)
    summary = summarize(cfg, accelerator, training, start, state, result, tracker.git_commit)
    finish(cfg, accelerator, training, tracker, summary)


def finish(cfg: Config, accelerator, training: Training, tracker, summary: dict) -> None:
    """Export the model with its card, write summary.json, say where everything is; then the upload, if asked."""
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(training.evaluated_model, keep_torch_compile=False)  # the average, if any
        export.write_final(model, out / "final", cfg, summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: v for k, v in summary.items() if k != "per_class_accuracy"}))
    tracker.finish(summary)
    print_once(
        f"\n{summary['eval_split']} accuracy {summary['test_accuracy']:.2%} on {summary['eval_samples']} images after "
        f"{summary['epochs']:g} epochs ({summary['train_seconds']:.0f} s of training, "
        f"{summary['wall_seconds']:.0f} s with evaluations)\n"
        f"plots: {out / 'curves.png'}, {out / 'confusion.png'} | model: {out / 'final'} | "
        f"summary: {out / 'summary.json'}\nthe full seed network on a GPU: {GPU_COMMAND}"
    )
    export.push(accelerator, out / "final", cfg)  # after everything is on disk: a failed upload loses nothing
    end_run(accelerator)


def determinism_line(cfg: Config, accelerator) -> str:
    """What train.deterministic is and what it costs here."""
    on_gpu = accelerator.device.type == "cuda"
    if not cfg.train.deterministic:
        return "deterministic off" + (
            " (cuDNN's kernel search on: fastest, not bit-identical from run to run)"
            if on_gpu
            else " (a CPU run is bit-identical anyway)"
        )
    if on_gpu:
        return (
            "deterministic on: cuDNN's kernel search off and deterministic kernels only, bit-identical from run to run "
            "but slower (by how much on this GPU: not measured yet; compare images/s with a run without it)"
        )
    return "deterministic on (on a CPU it changes no result; its cost here: docs/performance.md)"


def run_line(cfg: Config, accelerator, training: Training) -> str:
    """Where and how the run trains: processes, device, precision, how the global batch splits, its length."""
    world, steps_per_epoch = accelerator.num_processes, training.batches.steps_per_epoch
    threads = f", {torch.get_num_threads()} threads: {cpu_threads()[1]}" if accelerator.device.type == "cpu" else ""
    return (
        f"{world} process(es) on {accelerator.device} ({accelerator.distributed_type}{threads}), "
        f"{accelerator.mixed_precision} | global batch {cfg.train.batch_size} = {training.batches.micro_batch} per "
        f"device x {world} processes x {cfg.train.grad_accum_steps} accumulation steps | "
        f"{steps_per_epoch} steps/epoch, {training.total_steps} total"
    )


class Progress:
    """A live bar in a terminal; in a log file (SLURM, CI) plain log lines instead of carriage returns."""

    def __init__(self, accelerator, total_steps: int, step: int):
        self.interactive = sys.stderr.isatty()
        self.total_steps = total_steps
        self.bar = tqdm(
            total=total_steps,
            initial=step,
            desc="train",
            dynamic_ncols=True,
            disable=not (accelerator.is_main_process and self.interactive),
        )

    def show(self, report, step: int) -> None:
        self.bar.update()
        metrics = report.metrics
        if not metrics:
            return
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}")
        if not self.interactive:
            utilization = f" ({metrics['train/mfu']:.1%} of peak)" if "train/mfu" in metrics else ""
            print_once(
                f"step {step}/{self.total_steps} epoch {metrics['train/epoch']:.2f} loss {metrics['train/loss']:.4f} "
                f"lr {metrics['train/lr']:.3e} {metrics['train/images_per_second']:.0f} images/s "
                f"{metrics['train/tflops']:.3g} TFLOP/s{utilization}"
            )

    def close(self) -> None:
        self.bar.close()


class Evaluation:
    """The run's evaluations: when one is due, and each one run, logged and printed."""

    def __init__(self, accelerator, cfg: Config, training: Training, tracker, sample, eval_name: str):
        self.accelerator, self.cfg, self.training, self.tracker = accelerator, cfg, training, tracker
        self.sample, self.eval_name = sample, eval_name  # a few images the tracker shows with predictions

    def due(self, step: int) -> bool:
        """At the optimizer step nearest each multiple of train.eval_every_epochs epochs, and after the last step: a
        function of the step alone, so a resumed run evaluates where an uninterrupted one does."""
        every = self.cfg.train.eval_every_epochs * self.training.batches.steps_per_epoch  # in steps, maybe fractional
        nearest = round(step / every)
        return step == self.training.total_steps or (nearest >= 1 and math.floor(nearest * every + 0.5) == step)

    def run(self, state: RunState, log: bool = True, peak_memory_gb: float | None = None) -> dict:
        """Evaluate the run's model (the weight average with train.ema_decay, and then the training weights too); with
        `log`, log and print the result (with the peak memory so far, when given)."""
        accelerator, training = self.accelerator, self.training
        evaluate_one = functools.partial(
            evaluate,
            accelerator,
            loader=training.eval_loader,
            num_classes=self.cfg.model.num_classes,
            hflip=self.cfg.train.eval_hflip,
            layout=memory_format(self.cfg.train.channels_last),
        )
        if training.ema is not None:
            take_main_process_buffers(accelerator, training.ema.module)
        result = evaluate_one(training.evaluated_model)
        if training.ema is not None:
            raw = evaluate_one(training.model)
            result.update(raw_accuracy=raw["eval_accuracy"], raw_loss=raw["eval_loss"])
        result["eval_split"] = self.eval_name
        if not log:
            return result
        result.update(epoch=state.step / training.batches.steps_per_epoch, train_seconds=state.train_seconds)
        state.best_accuracy = max(state.best_accuracy or 0.0, result["eval_accuracy"])
        model = accelerator.unwrap_model(training.evaluated_model, keep_torch_compile=False)
        self.tracker.log_eval(
            result, step=state.step, model=model, sample_images=self.sample.images, sample_labels=self.sample.labels
        )
        beside = (
            f" (training weights without the average: {result['raw_accuracy']:.4f}, loss {result['raw_loss']:.4f})"
            if "raw_accuracy" in result
            else ""
        )
        memory = f" | peak memory {peak_memory_gb:.2f} GB" if peak_memory_gb is not None else ""
        print_once(
            f"epoch {result['epoch']:g}: {self.eval_name} accuracy {result['eval_accuracy']:.4f}, "
            f"loss {result['eval_loss']:.4f}{beside}{memory}"
        )
        return result

    def reached_target(self, result: dict, state: RunState) -> bool:
        """Whether this evaluation reached train.stop_at_accuracy, agreed by every rank (one all-reduce per evaluation,
        with a target only). The first one that does is recorded in `state`: the run's own time to the target."""
        target = self.cfg.train.stop_at_accuracy
        if not target:
            return False
        reached = bool(max_over_ranks(self.accelerator, result["eval_accuracy"] >= target)[0])
        if reached and state.target_accuracy != target:  # the first evaluation to reach this target
            state.target_accuracy, state.target_step = target, state.step
            state.target_train_seconds = state.train_seconds
            print_once(
                f"reached train.stop_at_accuracy {target:.2%} at epoch {result['epoch']:g} (step {state.step}, "
                f"{state.train_seconds:.0f} s of training): stopping"
            )
        return reached

    def target_reached_before(self, state: RunState) -> bool:
        """A resumed run whose evaluations already reached train.stop_at_accuracy: it trains no further."""
        target = self.cfg.train.stop_at_accuracy
        reached = bool(target) and (state.best_accuracy or 0.0) >= target
        if reached:
            print_once(f"this run already reached train.stop_at_accuracy {target:.2%} (best {state.best_accuracy:.4f})")
        return reached


def summarize(
    cfg: Config, accelerator, training: Training, start: RunState, state: RunState, result: dict, commit: str | None
) -> dict:
    """summary.json: the final evaluation and what the run took (images/s, TFLOP/s and utilisation: this attempt's,
    from `start`; peak memory: the most any process has held). Collective: call on every rank."""
    steps_per_epoch = training.batches.steps_per_epoch
    trained_seconds = state.train_seconds - start.train_seconds
    trained_images = (state.step - start.step) * cfg.train.batch_size
    images_per_second = trained_images / trained_seconds if trained_seconds else None
    compute = training.compute
    return {
        "test_accuracy": result["eval_accuracy"],
        "test_loss": result["eval_loss"],
        "eval_samples": result["eval_samples"],
        "eval_split": result["eval_split"],
        "per_class_accuracy": result["per_class_accuracy"],
        "global_step": state.step,
        "epochs": state.step / training.batches.steps_per_epoch,
        "images_per_second": images_per_second,
        "train_flops_per_image": compute.flops_per_image,
        "tflops": compute.tflops(images_per_second) if images_per_second else None,
        "mfu": compute.utilization(images_per_second) if images_per_second else None,
        "peak_tflops": compute.peak_tflops,
        "peak_source": compute.peak_source,
        "compute_precision": compute.precision,
        "peak_memory_gb": max_over_ranks(accelerator, peak_memory_gb(accelerator.device))[0],
        "train_seconds": state.train_seconds,
        "wall_seconds": state.wall_seconds,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "global_batch_size": cfg.train.batch_size,
        "tracker_run_id": state.tracker_run_id,
        "model_parameters": sum(p.numel() for p in training.evaluated_model.parameters()),
        "git_commit": commit,  # the code this attempt started with
        **_average_summary(cfg, result),
        **_target_summary(cfg, state, steps_per_epoch),
    }


def _average_summary(cfg: Config, result: dict) -> dict:
    """With train.ema_decay: test_accuracy above is the average's; the training weights' own beside it."""
    if "raw_accuracy" not in result:
        return {}
    return {
        "ema_decay": cfg.train.ema_decay,
        "test_accuracy_raw": result["raw_accuracy"],
        "test_loss_raw": result["raw_loss"],
    }


def _target_summary(cfg: Config, state: RunState, steps_per_epoch: int) -> dict:
    """With train.stop_at_accuracy: whether the run reached it and, measured by the run itself, after how many
    training seconds (no evaluations, no saves), optimizer steps and epochs (null when it never did, or when it did
    before this target was set: its checkpoints then record no time to it)."""
    target = cfg.train.stop_at_accuracy
    if not target:
        return {}
    timed = state.target_accuracy == target
    return {
        "stop_at_accuracy": target,
        "target_reached": (state.best_accuracy or 0.0) >= target,
        "seconds_to_target": state.target_train_seconds if timed else None,
        "steps_to_target": state.target_step if timed else None,
        "epochs_to_target": state.target_step / steps_per_epoch if timed else None,
    }


if __name__ == "__main__":
    main()
