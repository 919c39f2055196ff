"""Train the seed CIFAR-10 network with Hugging Face Accelerate.

    accelerate launch distcifar/train.py --config configs/cpu.yaml [--section.field VALUE ...]
    python -m distcifar.train --config configs/smoke.yaml          # one process

The same script runs on CPU, one GPU, several GPUs, several nodes and under SLURM. It resumes
from the newest checkpoint in --output_dir by default, and on SIGTERM, SIGINT or SIGUSR1 it saves
a checkpoint at the next optimizer step and exits with 128 + the signal number.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch distcifar/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from distcifar import export, tracking
from distcifar.checkpoint import Checkpointer
from distcifar.cli import entry_point
from distcifar.config import parse_config
from distcifar.data import load_splits
from distcifar.engine import build, evaluate, optimizer_steps
from distcifar.runtime import OutputLock, StopRequest, build_accelerator, hardware, leave, print_once


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
    parts = build(cfg, accelerator, eval_split, train_split)
    torch.manual_seed(cfg.train.seed * 1000 + accelerator.process_index)  # each rank its own dropout stream

    out = Path(cfg.output_dir)
    checkpoints = Checkpointer(accelerator, out / "checkpoints", cfg.checkpoint, cfg.to_dict())
    state = checkpoints.resume(cfg.resume, model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    tracker = tracking.Tracker(accelerator, cfg, out, state.tracker_run_id, hardware(accelerator))
    state.tracker_run_id = tracker.run_id
    steps_per_epoch, world = parts.batches.steps_per_epoch, accelerator.num_processes
    threads = f", {torch.get_num_threads()} threads" if accelerator.device.type == "cpu" else ""
    print_once(
        f"{len(train_split)} train / {len(eval_split)} {eval_name} images | {world} process(es) on "
        f"{accelerator.device} ({accelerator.distributed_type}{threads}), {accelerator.mixed_precision} | global batch "
        f"{cfg.train.batch_size} = {parts.batches.micro_batch} per device x {world} processes x "
        f"{cfg.train.grad_accum_steps} accumulation steps | {steps_per_epoch} steps/epoch, {parts.total_steps} total"
    )

    # Train: evaluate at epoch ends and at the end; the checkpointer decides when to save ----------
    # A live bar in a terminal; in a log file (SLURM, CI) plain log lines instead of carriage returns.
    interactive = sys.stderr.isatty()
    progress = tqdm(
        total=parts.total_steps,
        initial=state.step,
        desc="train",
        dynamic_ncols=True,
        disable=not (accelerator.is_main_process and interactive),
    )
    steps_before, seconds_before = state.step, state.train_seconds
    sample = eval_split.head(32)
    result, exit_signal = None, 0
    for report in optimizer_steps(accelerator, parts, cfg, state, tracker=tracker, stop=stop, checkpoints=checkpoints):
        progress.update()
        if report.metrics:
            progress.set_postfix(loss=f"{report.metrics['train/loss']:.3f}", lr=f"{report.metrics['train/lr']:.2e}")
            if not interactive:
                print_once(
                    f"step {state.step}/{parts.total_steps} epoch {report.metrics['train/epoch']:.2f} loss "
                    f"{report.metrics['train/loss']:.4f} lr {report.metrics['train/lr']:.3e} "
                    f"{report.metrics['train/images_per_second']:.0f} images/s"
                )
        epoch_end, last = state.step % steps_per_epoch == 0, state.step == parts.total_steps
        eval_accuracy = None
        if last or (epoch_end and (state.step // steps_per_epoch) % cfg.train.eval_every_epochs == 0):
            result = evaluate(accelerator, parts, cfg.model.num_classes, cfg.train.eval_hflip)
            result.update(epoch=state.step / steps_per_epoch, eval_split=eval_name, train_seconds=state.train_seconds)
            eval_accuracy = result["eval_accuracy"]
            state.best_accuracy = max(state.best_accuracy or 0.0, eval_accuracy)
            tracker.log_eval(
                result,
                step=state.step,
                model=accelerator.unwrap_model(parts.model, keep_torch_compile=False),
                sample_images=sample.images,
                sample_labels=sample.labels,
            )
            print_once(
                f"epoch {result['epoch']:g}: {eval_name} accuracy {eval_accuracy:.4f}, loss {result['eval_loss']:.4f}"
            )
        if checkpoints.due(state, report, epoch_end=epoch_end, last=last):
            checkpoints.save(
                state,
                model=parts.model,
                optimizer=parts.optimizer,
                scheduler=parts.scheduler,
                eval_accuracy=eval_accuracy,
            )
        if report.stop_signal:
            exit_signal = report.stop_signal
            break
    progress.close()

    if exit_signal:
        print_once(
            f"stopped by signal {exit_signal} at step {state.step}; checkpoint saved, resume with the same command"
        )
        tracker.finish(exit_code=128 + exit_signal)
        leave(accelerator, 128 + exit_signal)

    if result is None:  # resumed from a finished run: nothing trained, evaluate once
        result = evaluate(accelerator, parts, cfg.model.num_classes, cfg.train.eval_hflip)
        result["eval_split"] = eval_name
    trained_seconds = state.train_seconds - seconds_before
    summary = {
        "test_accuracy": result["eval_accuracy"],
        "test_loss": result["eval_loss"],
        "eval_samples": result["eval_samples"],
        "eval_split": eval_name,
        "per_class_accuracy": result["per_class_accuracy"],
        "global_step": state.step,
        "epochs": state.step / steps_per_epoch,
        "images_per_second": (state.step - steps_before) * cfg.train.batch_size / trained_seconds
        if trained_seconds
        else None,
        "train_seconds": state.train_seconds,
        "wall_seconds": state.wall_seconds,
        "num_processes": world,
        "mixed_precision": accelerator.mixed_precision,
        "global_batch_size": cfg.train.batch_size,
        "tracker_run_id": tracker.run_id,
    }
    if accelerator.is_main_process:
        export.write_final(accelerator.unwrap_model(parts.model, keep_torch_compile=False), out / "final", cfg, summary)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps({k: v for k, v in summary.items() if k != "per_class_accuracy"}))
    tracker.finish(summary)
    print_once(
        f"\n{eval_name} accuracy {summary['test_accuracy']:.2%} on {summary['eval_samples']} images after "
        f"{summary['epochs']:g} epochs ({summary['train_seconds']:.0f} s of training, {summary['wall_seconds']:.0f} s with evaluations)\n"
        f"plots: {out / 'curves.png'}, {out / 'confusion.png'} | model: {out / 'final'} | summary: {out / 'summary.json'}\n"
        "the full seed network on a GPU: accelerate launch --config_file launch/gpu.yaml distcifar/train.py "
        "--config configs/default.yaml"
    )
    export.push(accelerator, out / "final", cfg)  # after everything is on disk: a failed upload loses nothing
    leave(accelerator)


if __name__ == "__main__":
    main()
