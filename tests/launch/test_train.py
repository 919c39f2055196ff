"""End-to-end train.py runs: a short run learns, runs are reproducible, and every README promise about
resume, signals, checkpoint options, data options and trackers holds through a real run."""

import json
import math
import re
import signal
import time

import pytest
from safetensors.torch import load_file

from support import launch_command, read_metrics, run, start, train_args

SUMMARY_KEYS = {
    "test_accuracy",
    "test_loss",
    "eval_samples",
    "global_step",
    "epochs",
    "images_per_second",
    "train_seconds",
    "wall_seconds",
    "num_processes",
    "mixed_precision",
}


def test_smoke_run_through_accelerate_launch_lowers_the_loss(tmp_path, synthetic_data):
    out = tmp_path / "run"
    result = run(launch_command(1) + train_args(out, synthetic_data, "--train.epochs", "3"))
    assert "global batch 32 = 32 per device x 1 processes x 1 accumulation steps" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["eval_samples"] == 101 and summary["global_step"] == 24 and summary["num_processes"] == 1
    losses = [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]
    assert len(losses) == 24
    # the rate each step used: a 4-step warm-up to 0.003 (8 steps per epoch x 0.5), then cosine over 20 steps
    lrs = [m["train/lr"] for m in read_metrics(out) if "train/lr" in m]
    assert lrs[:6] == pytest.approx([0.00075, 0.0015, 0.00225, 0.003, 0.003, 0.003 * (1 + math.cos(math.pi / 20)) / 2])
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    evals = [m for m in read_metrics(out) if "eval/accuracy" in m]
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
    timing = {"train/images_per_second", "train/images_per_second_per_process", "train/epoch_seconds", "train/seconds"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(metrics_a) == strip(metrics_b)


def test_fp16_on_cpu_is_refused(tmp_path, synthetic_data):
    result = run(
        launch_command(1, launcher="python") + train_args(tmp_path, synthetic_data, "--train.mixed_precision", "fp16"),
        check=False,
    )
    assert result.returncode == 2
    assert "fp16 needs a GPU" in result.stderr


def test_the_cpu_recipe_learns_real_cifar10(tmp_path, real_data):
    # configs/cpu.yaml (the README's main command) on a slice: 10,000 images, 3 epochs, 2,000 test images
    out = tmp_path / "real"
    run(
        launch_command(1)
        + [
            "--config",
            "configs/cpu.yaml",
            "--output_dir",
            str(out),
            "--data.path",
            str(real_data),
            "--data.train_limit",
            "10000",
            "--data.eval_limit",
            "2000",
            "--train.epochs",
            "3",
            "--train.log_every",
            "10",
            "--tracking.report_to",
            "none",
        ],
        timeout=900,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_samples"] == 2000 and summary["global_step"] == 117
    # chance is 0.10 and colour statistics alone reach about 0.2; this run reaches about 0.39-0.42
    assert summary["test_accuracy"] > 0.33, summary
    evals = [m["eval/accuracy"] for m in read_metrics(out) if "eval/accuracy" in m]
    assert evals == sorted(evals) and evals[-1] > evals[0] + 0.1
    losses = [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3


# ---------------------------------------------------------------------------------------------
# README promises, each through a real train.py run


def _checkpoint_steps(out):
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1], ids=["INT", "TERM", "USR1"])
def test_a_signal_straight_to_train_py_checkpoints_that_step_and_exits_128_plus_signum(
    tmp_path, synthetic_data, signum
):
    out = tmp_path / "run"
    process = start(launch_command(1, launcher="python") + train_args(out, synthetic_data, "--train.epochs", "3"))
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 3:  # steps 1-3 logged: mid-epoch 1
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, output[-2000:]
    stopped = re.search(r"stopped by signal (\d+) at step (\d+)", output)
    assert stopped and int(stopped.group(1)) == signum, output[-2000:]
    step = int(stopped.group(2))
    assert 3 <= step < 24  # the step after the signal, before the end of the run
    assert _checkpoint_steps(out)[-1] == step
    assert read_metrics(out)[-1]["step"] <= step
    assert not (out / "summary.json").exists()


def test_resume_finished_part_then_never_then_an_older_path(tmp_path, synthetic_data):
    out = tmp_path / "run"
    args = ("--checkpoint.every_steps", "3", "--checkpoint.keep", "10")
    # a run that ends at step 4 (max_steps) resumes from step_00000004 and runs on to 16
    run(launch_command(1, launcher="python") + train_args(out, synthetic_data, "--train.max_steps", "4", *args))
    assert _checkpoint_steps(out) == [3, 4]
    result = run(launch_command(1, launcher="python") + train_args(out, synthetic_data, *args))
    assert f"resumed from {out / 'checkpoints' / 'step_00000004'} at step 4" in result.stdout
    assert _checkpoint_steps(out) == [3, 4, 6, 8, 9, 12, 15, 16]  # every 3 steps and each epoch end (8, 16)
    steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert steps == [1, 2, 3, 4, *range(5, 17)]
    # --resume PATH: an older checkpoint, into a new folder
    older = out / "checkpoints" / "step_00000009"
    other = tmp_path / "from9"
    result = run(launch_command(1, launcher="python") + train_args(other, synthetic_data, "--resume", str(older)))
    assert f"resumed from {older} at step 9" in result.stdout
    assert [m["step"] for m in read_metrics(other) if "train/loss" in m] == list(range(10, 17))
    # --resume never: from scratch although checkpoints are there
    result = run(launch_command(1, launcher="python") + train_args(out, synthetic_data, "--resume", "never"))
    assert "resumed" not in result.stdout
    assert json.loads((out / "summary.json").read_text())["global_step"] == 16
    assert [m["step"] for m in read_metrics(out) if "train/loss" in m][-16:] == list(range(1, 17))
    # a folder that is not there is a usage error
    result = run(
        launch_command(1, launcher="python") + train_args(other, synthetic_data, "--resume", str(tmp_path / "nope")),
        check=False,
    )
    assert result.returncode == 2 and "no such checkpoint folder" in result.stderr


def test_weights_only_starts_a_new_schedule_from_the_weights(tmp_path, synthetic_data):
    first, second = tmp_path / "first", tmp_path / "second"
    run(launch_command(1, launcher="python") + train_args(first, synthetic_data, "--train.epochs", "1"))
    source = first / "checkpoints" / "step_00000008"
    # a different data config would be refused for a plain resume; weights_only takes the weights and starts at step 1
    changed = ("--data.train_limit", "128", "--resume", str(source))
    refused = run(launch_command(1, launcher="python") + train_args(second, synthetic_data, *changed), check=False)
    assert refused.returncode == 2 and "data.train_limit" in refused.stderr
    result = run(
        launch_command(1, launcher="python")
        + train_args(second, synthetic_data, *changed, "--checkpoint.weights_only", "true")
    )
    assert f"resumed from {source} at step 8 (weights only)" in result.stdout
    losses = {m["step"]: m["train/loss"] for m in read_metrics(second) if "train/loss" in m}
    assert sorted(losses) == list(range(1, 9))  # 128 images / 32 = 4 steps per epoch, 2 epochs
    fresh = tmp_path / "fresh"
    run(launch_command(1, launcher="python") + train_args(fresh, synthetic_data, "--data.train_limit", "128"))
    fresh_losses = {m["step"]: m["train/loss"] for m in read_metrics(fresh) if "train/loss" in m}
    assert losses[1] < 0.8 * fresh_losses[1]  # the first step already has trained weights


def test_keep_best_every_minutes_tensorboard_data_file_and_val_size(tmp_path, synthetic_data):
    out = tmp_path / "run"
    result = run(
        launch_command(1, launcher="python")
        + train_args(
            out,
            synthetic_data / "train.parquet",
            "--data.val_size",
            "56",
            "--train.epochs",
            "3",
            "--checkpoint.keep",
            "1",
            "--checkpoint.keep_best",
            "true",
            "--checkpoint.every_minutes",
            "0.0001",
            "--tracking.report_to",
            "tensorboard",
        )
    )
    # --data.path FILE (train only) + val_size: 200 training images, 56 held out for evaluation
    assert "200 train / 56 validation images" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "validation" and summary["eval_samples"] == 56
    # every_minutes: the timer is due at every step here, so every step was saved before pruning
    # keep 1 + keep_best: the newest, and the best by eval accuracy (the newest of equals)
    evals = [(m["eval/accuracy"], m["step"]) for m in read_metrics(out) if "eval/accuracy" in m]
    best_step = max(evals)[1]
    assert _checkpoint_steps(out) == sorted({best_step, 18})
    # tensorboard: real event files with the logged scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"train/loss", "eval/accuracy", "train/lr"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 19))


def test_a_short_run_learns_the_synthetic_classes(tmp_path, synthetic_data):
    # 96 steps of the tiny network on 256 images of 10 colour classes: a learning network gets them all
    out = tmp_path / "run"
    run(
        launch_command(1, launcher="python")
        + train_args(out, synthetic_data, "--train.batch_size", "16", "--train.epochs", "6", "--model.dropout", "0.0")
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95, summary  # chance: 0.1; one class answered for all: about 0.1
    losses = [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8


def test_a_reachable_target_stops_the_run_at_the_first_evaluation_that_reaches_it(tmp_path, synthetic_data):
    # The learning run above (16 steps per epoch), evaluated every half epoch, on 2 processes that must agree to
    # stop (one that did not would hang the other); target 0.5, which it reaches well before its 96 steps end.
    out = tmp_path / "run"
    args = [
        *("--train.batch_size", "16", "--train.epochs", "6", "--model.dropout", "0.0"),
        *("--train.eval_every_epochs", "0.5", "--train.stop_at_accuracy", "0.5"),
    ]
    result = run(launch_command(2) + train_args(out, synthetic_data, *args))
    evaluations = [m for m in read_metrics(out) if "eval/accuracy" in m]
    assert [m["step"] for m in evaluations] == list(range(8, evaluations[-1]["step"] + 1, 8))
    assert all(m["eval/accuracy"] < 0.5 for m in evaluations[:-1]) and evaluations[-1]["eval/accuracy"] >= 0.5
    step = evaluations[-1]["step"]
    assert step < 96, "the target was not reached before the end: this test proves nothing"
    said = re.search(
        r"reached train.stop_at_accuracy 50.00% at epoch ([\d.]+) \(step (\d+), (\d+) s of training\)", result.stdout
    )
    assert said and int(said.group(2)) == step and float(said.group(1)) == step / 16, result.stdout[-2000:]
    assert max(m["step"] for m in read_metrics(out)) == step  # not one step more
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == summary["steps_to_target"] == step and summary["target_reached"] is True
    assert summary["epochs_to_target"] == step / 16 and summary["stop_at_accuracy"] == 0.5
    assert summary["seconds_to_target"] == evaluations[-1]["train/seconds"] == summary["train_seconds"]
    assert summary["test_accuracy"] == evaluations[-1]["eval/accuracy"]
    assert _checkpoint_steps(out)[-1] == step  # saved there, also at a half epoch
    assert "It stopped at the first evaluation that reached 50.00%" in (out / "final" / "README.md").read_text()
    # the same command again: the run is over, it trains no further and ends as it did
    again = run(launch_command(1, launcher="python") + train_args(out, synthetic_data, *args))
    assert "this run already reached train.stop_at_accuracy 50.00%" in again.stdout
    assert max(m["step"] for m in read_metrics(out)) == step
    assert json.loads((out / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]


def test_the_wandb_run_id_is_carried_through_a_real_resume(tmp_path, synthetic_data):
    out = tmp_path / "run"
    first = run(
        launch_command(1, launcher="python")
        + train_args(out, synthetic_data, "--tracking.report_to", "wandb", "--train.max_steps", "4")
    )
    run_id = json.loads((out / "summary.json").read_text())["tracker_run_id"]
    second = run(
        launch_command(1, launcher="python") + train_args(out, synthetic_data, "--tracking.report_to", "wandb")
    )
    assert "at step 4" in second.stdout, first.stdout[-2000:]
    assert json.loads((out / "summary.json").read_text())["tracker_run_id"] == run_id
    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # two attempts, one W&B run
