"""End-to-end train.py runs: a short run learns, runs are reproducible, and every README promise about
resume, signals, checkpoint options, data options and trackers holds through a real run."""

import json
import math
import re
import signal
import time

import pytest
from safetensors.torch import load_file

from support import TINY_MODEL_CONFIG, launch_command, read_metrics, read_offline_run, run, start, train_args

SUMMARY_KEYS = {
    "test_accuracy",
    "train_flops_per_image",
    "tflops",
    "mfu",
    "peak_tflops",
    "peak_memory_gb",
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
    result = run(
        launch_command(1) + train_args(out, synthetic_data, "--train.epochs", "3", "--train.profile_steps", "10:11")
    )
    assert "global batch 32 = 32 per device x 1 processes x 1 accumulation steps" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    _check_compute_figures(result.stdout, summary, read_metrics(out))
    _check_profile(out, result.stdout, first=10, last=11)
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


def _check_compute_figures(stdout: str, summary: dict, rows: list[dict]) -> None:
    """FLOPs per image, TFLOP/s and utilisation in the header, the log lines and summary.json, and the peak memory
    at each epoch end; each figure consistent with the images/s it comes from."""
    flops = summary["train_flops_per_image"]
    header = re.search(
        r"([\d.]+) GFLOP per training image .* \| peak ([\d.]+) TFLOP/s \(fp32 .*matmul measured", stdout
    )
    assert header and float(header[1]) == pytest.approx(flops / 1e9, rel=1e-2), stdout[:2000]
    assert float(header[2]) == pytest.approx(summary["peak_tflops"], rel=1e-2)
    assert summary["tflops"] == pytest.approx(summary["images_per_second"] * flops / 1e12, rel=1e-9)
    assert summary["mfu"] == pytest.approx(summary["tflops"] / summary["peak_tflops"], rel=1e-9)
    lines = re.findall(r"^step \d+/\d+ .* ([\d.]+) images/s ([\d.e-]+) TFLOP/s \(([\d.]+)% of peak\)$", stdout, re.M)
    logged = [row for row in rows if "train/loss" in row]
    assert len(lines) == len(logged)
    for (images, tflops, percent), row in zip(lines, logged):
        assert float(images) == pytest.approx(row["train/images_per_second"], abs=0.5)
        assert float(tflops) == pytest.approx(row["train/tflops"], rel=1e-2, abs=1e-6)
        assert row["train/tflops"] == pytest.approx(row["train/images_per_second"] * flops / 1e12, rel=1e-9)
        assert float(percent) == pytest.approx(100 * row["train/mfu"], abs=0.06)
    memory = [row["system/peak_memory_gb"] for row in rows if "system/peak_memory_gb" in row]
    assert len(memory) == summary["epochs"] and 0.1 < memory[0] <= memory[-1] <= summary["peak_memory_gb"]
    printed = re.findall(r"^epoch \d+: test accuracy .* \| peak memory ([\d.]+) GB$", stdout, re.M)
    assert [float(m) for m in printed] == pytest.approx(memory, abs=0.006)


def _check_profile(out, stdout: str, first: int, last: int) -> None:
    """The trace parses, marks exactly the requested optimizer steps, and holds convolutions from those steps only:
    every one of the tiny network's convolutions, forward and backward, once per recorded step."""
    trace = out / "profile" / f"rank0.steps_{first}-{last}.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    steps = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events if e["name"].startswith("optimizer step ")}
    assert sorted(steps) == [f"optimizer step {n}" for n in range(first, last + 1)]
    convolutions = [e for e in events if e.get("cat") == "cpu_op" and "convolution" in e["name"]]
    assert all(
        any(start <= e["ts"] <= e["ts"] + e["dur"] <= end for start, end in steps.values()) for e in convolutions
    )
    blocks = TINY_MODEL_CONFIG.block_convs
    per_step = 2 + sum(blocks) + len(blocks)  # the stem's 2, the blocks' convs, their 1x1 skips
    for name in ("aten::convolution", "aten::convolution_backward"):
        assert sum(e["name"] == name for e in convolutions) == per_step * (last - first + 1), name
    assert "aten::convolution_backward" in (trace.parent / f"rank0.steps_{first}-{last}.top_operators.txt").read_text()
    assert f"profile of steps {first}-{last}: {trace}" in stdout and "Self CPU time total" in stdout


def test_same_seed_same_result_bit_for_bit(tmp_path, synthetic_data):
    # the second run with train.deterministic: on a CPU it changes no result (on a GPU it is what makes runs repeat)
    finals = []
    for name, deterministic in (("a", "false"), ("b", "true")):
        out = tmp_path / name
        result = run(
            launch_command(1, launcher="python")
            + train_args(out, synthetic_data, "--train.epochs", "1", "--train.deterministic", deterministic)
        )
        assert f"deterministic {'on' if deterministic == 'true' else 'off'}" in result.stdout
        finals.append((load_file(out / "final" / "model.safetensors"), read_metrics(out)))
    (weights_a, metrics_a), (weights_b, metrics_b) = finals
    assert weights_a.keys() == weights_b.keys()
    assert all((weights_a[k] == weights_b[k]).all() for k in weights_a)
    timing = {
        "train/images_per_second",
        "train/images_per_second_per_process",
        "train/tflops",
        "train/mfu",
        "train/epoch_seconds",
        "train/seconds",
        "system/peak_memory_gb",
    }
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
    # the throughput and memory figures reach W&B under the names metrics.jsonl has
    history = read_offline_run(files[-1], wait_s=20)["history"]
    logged = {}
    for row in read_metrics(out):  # a step's rows (its log row, its epoch row) in one
        logged.setdefault(row["step"], {}).update(row)
    for key in ("train/tflops", "train/mfu", "system/peak_memory_gb"):
        steps = [step for step, row in history.items() if key in row]
        assert steps and all(history[step][key] == pytest.approx(logged[step][key]) for step in steps), key
