"""summary.json, a finished run's record: its final evaluation and what the run took; and the lines that end the run's
output. scripts/gpu_check.py and the results in results/ read these fields."""

from __future__ import annotations

from pathlib import Path

from distcifar.config import Config
from distcifar.engine import Progress, Training
from distcifar.model import parameter_count
from distcifar.ranks import max_over_ranks
from distcifar.utilization import peak_memory_gb


def summarize(
    cfg: Config,
    accelerator,
    training: Training,
    start: Progress,
    progress: Progress,
    result: dict,
    test_time_accuracies: dict,
    tracker,
) -> dict:
    """The final evaluation (`result`; `test_time_accuracies` beside it) and what the run took: images/s, TFLOP/s and
    utilisation of this attempt (from `start`), the most memory any process has held. Collective."""
    trained_seconds = progress.train_seconds - start.train_seconds
    trained_images = (progress.step - start.step) * cfg.train.batch_size
    rates = (
        training.compute.rates(trained_images / trained_seconds, accelerator.num_processes) if trained_seconds else {}
    )
    compute = training.compute
    return {
        "test_accuracy": result["eval_accuracy"],
        **test_time_accuracies,
        "test_loss": result["eval_loss"],
        "eval_samples": result["eval_samples"],
        "eval_split": result["eval_split"],
        "per_class_accuracy": result["per_class_accuracy"],
        "global_step": progress.step,
        "epochs": progress.step / training.batches.steps_per_epoch,
        "images_per_second": rates.get("images_per_second"),
        "train_flops_per_image": compute.flops_per_image,
        "tflops": rates.get("tflops"),
        "mfu": rates.get("mfu"),
        "peak_tflops": compute.peak_tflops,
        "peak_source": compute.peak_source,
        "compute_precision": compute.precision,
        "peak_memory_gb": max_over_ranks(accelerator, peak_memory_gb(accelerator.device))[0],
        "train_seconds": progress.train_seconds,
        "wall_seconds": progress.wall_seconds,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "global_batch_size": cfg.train.batch_size,
        "tracker_run_id": tracker.run_id,
        "model_parameters": parameter_count(training.evaluated_model),
        "git_commit": tracker.git_commit,  # the code this attempt started with
    }


def closing_lines(summary: dict, out: Path, plots: bool) -> str:
    """What the run's output ends with: the final accuracy (the test-time views beside it) and where the files are."""
    views = (
        f"; with test-time views {summary['test_accuracy_hflip']:.2%} (mirror), "
        f"{summary['test_accuracy_hflip_translate']:.2%} (mirror and 1-pixel shifts)"
        if summary["test_accuracy_hflip"] is not None
        else ""
    )
    return (
        f"\n{summary['eval_split']} accuracy {summary['test_accuracy']:.2%} on {summary['eval_samples']} images after "
        f"{summary['epochs']:g} epochs ({summary['train_seconds']:.0f} s of training, "
        f"{summary['wall_seconds']:.0f} s with evaluations){views}\n"
        + (f"plots: {out / 'curves.png'}, {out / 'confusion.png'} | " if plots else "")
        + f"model: {out / 'final'} | summary: {out / 'summary.json'}"
    )
