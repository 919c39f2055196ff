"""End-to-end training runs through the real launchers."""

import json

import pytest
from safetensors.torch import load_file

from conftest import launch_command, read_metrics, run, train_args

SUMMARY_KEYS = {"test_accuracy", "test_loss", "eval_samples", "global_step", "epochs", "images_per_second",
                "wall_seconds", "num_processes", "mixed_precision"}


def test_smoke_run_through_accelerate_launch_lowers_the_loss(tmp_path, synthetic_data):
    out = tmp_path / "run"
    result = run(launch_command(1) + train_args(out, synthetic_data, "--train.epochs", "3"))
    assert "global batch 32 = 32 per device x 1 processes x 1 accumulation steps" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["eval_samples"] == 101 and summary["global_step"] == 24 and summary["num_processes"] == 1
    losses = [m["train_loss"] for m in read_metrics(out) if "train_loss" in m]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    evals = [m for m in read_metrics(out) if "eval_accuracy" in m]
    assert [m["step"] for m in evals] == [8, 16, 24]
    assert json.loads((out / "config.json").read_text())["train"]["batch_size"] == 32


def test_same_seed_same_result_bit_for_bit(tmp_path, synthetic_data):
    finals = []
    for name in ("a", "b"):
        out = tmp_path / name
        run(launch_command(1, launcher="python") + train_args(out, synthetic_data, "--train.epochs", "1"))
        finals.append((load_file(out / "final" / "model.safetensors"), read_metrics(out)))
    (weights_a, metrics_a), (weights_b, metrics_b) = finals
    assert weights_a.keys() == weights_b.keys()
    assert all((weights_a[k] == weights_b[k]).all() for k in weights_a)
    timing = {"images_per_second", "images_per_second_per_process", "epoch_seconds"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(metrics_a) == strip(metrics_b)


def test_fp16_on_cpu_is_refused(tmp_path, synthetic_data):
    result = run(launch_command(1, launcher="python") + train_args(tmp_path, synthetic_data, "--train.mixed_precision", "fp16"),
                 check=False)
    assert result.returncode == 2
    assert "fp16 needs a GPU" in result.stderr


def test_real_cifar10_beats_chance_clearly(tmp_path, real_data):
    out = tmp_path / "real"
    run(launch_command(1) + [
        "--output_dir", str(out), "--data.path", str(real_data),
        "--model.block_channels", "[8,16,16,32,32,48]", "--model.classifier_hidden", "[64]", "--model.dropout", "0.1",
        "--data.train_limit", "2500", "--data.eval_limit", "500", "--train.epochs", "3", "--train.batch_size", "64",
        "--train.log_every", "20", "--optim.name", "adam", "--optim.lr", "0.003", "--optim.schedule", "onecycle",
        "--optim.warmup_epochs", "0.5", "--optim.label_smoothing", "0", "--tracking.report_to", "none",
    ], timeout=900)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_samples"] == 500
    assert summary["test_accuracy"] > 0.2, summary  # chance is 0.10; this small run reaches about 0.25
