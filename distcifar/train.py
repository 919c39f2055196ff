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
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch distcifar/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from distcifar import export, profiling, summary, tracking
from distcifar.accelerator import build_accelerator, determinism_line
from distcifar.checkpoint import Checkpointer
from distcifar.config import Config, parse_config
from distcifar.data import load_splits
from distcifar.engine import Progress, StepReport, Training, build_training, optimizer_steps
from distcifar.errors import entry_point
from distcifar.hardware import cpu_threads, hardware
from distcifar.lock import OutputLock
from distcifar.ranks import end_run, max_over_ranks, print_once
from distcifar.signals import StopRequest
from distcifar.validation import Validator


@entry_point
def main(argv: list[str] | None = None) -> None:
    # Parse and build ------------------------------------------------------------------------------
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

    # Resume: the checkpointer restores the tensors and hands each component its part of the run state ----
    checkpointer = Checkpointer.for_run(accelerator, cfg, training)
    run_state = checkpointer.resume(cfg.resume)
    progress = Progress()
    if run_state:
        progress.load_state_dict(run_state)
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tracker = tracking.Tracker(
        accelerator, cfg, out, run_state.get("tracker_run_id"), hardware(accelerator), start_step=progress.step
    )
    validator = Validator(accelerator, cfg, training, tracker, eval_split.head(32), eval_name)
    validator.load_state_dict(run_state)
    print_once(
        f"{len(train_split)} train / {len(eval_split)} {eval_name} images | {run_line(cfg, accelerator, training)}\n"
        f"{training.compute.describe()} | {determinism_line(cfg.train.deterministic, accelerator.device)}"
    )

    # Run, then finish -----------------------------------------------------------------------------
    start = dataclasses.replace(progress)  # where this attempt starts: its own images/s
    result, signum = train(accelerator, cfg, training, progress, validator, checkpointer, tracker, stop)
    if signum:  # the attempt's end is recorded before the line: whoever read the output may be gone (a killed tee)
        tracker.finish(exit_code=128 + signum, step=progress.step)
        print_once(
            f"stopped by signal {signum} at step {progress.step}; checkpoint saved, resume with the same command"
        )
        end_run(accelerator, 128 + signum)
    if result is None:  # resumed from a finished run (or one that reached its target): nothing trained
        result = validator.evaluate()
    views = validator.test_time_accuracies()
    run_summary = summary.summarize(cfg, accelerator, training, start, progress, result, views, tracker)
    run_summary.update(validator.summary(result))
    finish(cfg, accelerator, training, tracker, run_summary)


def train(
    accelerator, cfg: Config, training: Training, progress: Progress, validator, checkpointer, tracker, stop
) -> tuple[dict | None, int]:
    """The loop. After each optimizer step, in this order: log, let the ranks agree on a stop signal and the
    checkpoint timer (where the cadence says), evaluate if due (and check the target), save if due, stop.
    Returns the last evaluation (None if nothing was evaluated) and the stop signal (0: the run ended)."""
    cadence, result, signum = training.cadence, None, 0
    until = progress.step if validator.target_reached_before() else None  # then nothing is left to train
    bar = ProgressBar(accelerator, training.total_steps, progress.step)
    steps = optimizer_steps(accelerator, training, cfg.optim, progress, until)
    with contextlib.closing(profiling.profiled(steps, cfg, progress, accelerator, Path(cfg.output_dir))) as steps:
        for report in steps:
            step = report.step
            bar.show(report)
            for row in report.rows:
                tracker.log(row, step=step)
            timer_due = False
            if cadence.agrees(step):
                signum, timer_due = max_over_ranks(accelerator, stop.signum, checkpointer.timer_expired())
            evaluation = (
                validator.validate(progress, report.peak_memory_gb) if validator.should_validate(step) else None
            )
            reached = evaluation is not None and validator.reached_target(evaluation, progress)
            result = evaluation or result
            if cadence.saves(step) or signum or timer_due or reached:
                run_state = {**progress.state_dict(), **validator.state_dict(), "tracker_run_id": tracker.run_id}
                checkpointer.save(step, run_state, evaluation["eval_accuracy"] if evaluation else None)
            if signum or reached:
                break
    bar.close()
    return result, int(signum)


def finish(cfg: Config, accelerator, training: Training, tracker, run_summary: dict) -> None:
    """Export the model with its card, write summary.json, say where everything is; then the upload, if asked."""
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(training.evaluated_model, keep_torch_compile=False)  # the average, if any
        export.write_final(model, out / "final", cfg, run_summary)
        (out / "summary.json").write_text(json.dumps(run_summary, indent=2))
        print(json.dumps({k: v for k, v in run_summary.items() if k != "per_class_accuracy"}))
    tracker.finish(run_summary, step=run_summary["global_step"])
    print_once(summary.closing_lines(run_summary, out, cfg.tracking.plots))
    export.push(accelerator, out / "final", cfg)  # after everything is on disk: a failed upload loses nothing
    end_run(accelerator)


def run_line(cfg: Config, accelerator, training: Training) -> str:
    """Where and how the run trains: processes, device, threads, precision, how the global batch splits, its length."""
    world, steps_per_epoch = accelerator.num_processes, training.batches.steps_per_epoch
    threads = f", {torch.get_num_threads()} threads: {cpu_threads()[1]}" if accelerator.device.type == "cpu" else ""
    return (
        f"{world} process(es) on {accelerator.device} ({accelerator.distributed_type}{threads}), "
        f"{accelerator.mixed_precision} | global batch {cfg.train.batch_size} = {training.batches.micro_batch} per "
        f"device x {world} processes x {cfg.train.grad_accum_steps} accumulation steps | "
        f"{steps_per_epoch} steps/epoch, {training.total_steps} total"
    )


class ProgressBar:
    """A live bar in a terminal; in a log file (SLURM, CI) plain log lines instead of carriage returns."""

    def __init__(self, accelerator, total_steps: int, step: int):
        self.interactive = sys.stderr.isatty()
        self.total_steps = total_steps
        show = accelerator.is_main_process and self.interactive
        self.bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True, disable=not show)

    def show(self, report: StepReport) -> None:
        self.bar.update()
        metrics = report.metrics
        if not metrics:
            return
        self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}")
        if not self.interactive:
            utilization = f" ({metrics['train/mfu']:.1%} of peak)" if "train/mfu" in metrics else ""
            print_once(
                f"step {report.step}/{self.total_steps} epoch {metrics['train/epoch']:.2f} "
                f"loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.3e} "
                f"{metrics['train/images_per_second']:.0f} images/s {metrics['train/tflops']:.3g} TFLOP/s{utilization}"
            )

    def close(self) -> None:
        self.bar.close()


if __name__ == "__main__":
    main()
