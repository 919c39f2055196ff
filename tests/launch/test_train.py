"""End-to-end train.py runs: a short run learns, runs are reproducible, and every README promise about
resume, signals, checkpoint options, data options and trackers holds through a real run."""

import json
import math
import os
import re
import signal
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from support import (
    ACCELERATE,
    REPO,
    TINY_MODEL_CONFIG,
    launch_command,
    read_metrics,
    read_offline_run,
    run,
    start,
    train_args,
)

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
        r"([\d.]+) GFLOP per training image .* \| peak ([\d.]+) TFLOP/s \((fp32|bf16) .*matmul measured", stdout
    )
    assert header and float(header[1]) == pytest.approx(flops / 1e9, rel=1e-2), stdout[:2000]
    assert header[3] == summary["compute_precision"]  # the peak of the precision the run computes in (CPU: its own)
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


def test_same_seed_same_result_bit_for_bit_and_logging_every_4_steps_logs_their_mean(tmp_path, synthetic_data):
    # Two runs of one seed, the second logging every 4 steps (the default cadence's code path, not every step's) and
    # with train.deterministic (on a CPU it changes no result; on a GPU it is what makes runs repeat): the same
    # weights bit for bit, and each of the second run's rows is the mean of the first run's 4.
    finals = []
    for name, log_every, deterministic in (("a", "1", "false"), ("b", "4", "true")):
        out = tmp_path / name
        result = run(
            launch_command(1, launcher="python")
            + train_args(
                out,
                synthetic_data,
                "--train.epochs",
                "1",
                "--train.log_every",
                log_every,
                "--train.deterministic",
                deterministic,
            )
        )
        assert f"deterministic {'on' if deterministic == 'true' else 'off'}" in result.stdout
        finals.append((load_file(out / "final" / "model.safetensors"), read_metrics(out)))
    (weights_a, metrics_a), (weights_b, metrics_b) = finals
    assert weights_a.keys() == weights_b.keys()
    assert all((weights_a[k] == weights_b[k]).all() for k in weights_a)
    every_step = {m["step"]: m for m in metrics_a if "train/loss" in m}
    every_4th = {m["step"]: m for m in metrics_b if "train/loss" in m}
    assert sorted(every_step) == list(range(1, 9)) and sorted(every_4th) == [4, 8]
    for step, row in every_4th.items():
        window = [every_step[s]["train/loss"] for s in range(step - 3, step + 1)]
        assert row["train/loss"] == pytest.approx(sum(window) / 4, rel=1e-6), (step, window)
        assert row["train/lr"] == every_step[step]["train/lr"]  # the rate the logged step used
        assert row["train/grad_norm"] == pytest.approx(every_step[step]["train/grad_norm"], rel=1e-6)
    # images/s over each 4-step window: 4 x 32 images in the window's training time, which the epoch's time adds up
    (epoch,) = [m["train/epoch_seconds"] for m in metrics_b if "train/epoch_seconds" in m]
    window_seconds = [4 * 32 / every_4th[step]["train/images_per_second"] for step in (4, 8)]
    assert sum(window_seconds) == pytest.approx(epoch, rel=1e-9)
    evals = lambda rows: [(m["step"], m["eval/accuracy"], m["eval/loss"]) for m in rows if "eval/accuracy" in m]  # noqa: E731
    assert evals(metrics_a) == evals(metrics_b)


def test_fp16_on_cpu_is_refused(tmp_path, synthetic_data):
    result = run(
        launch_command(1, launcher="python") + train_args(tmp_path, synthetic_data, "--train.mixed_precision", "fp16"),
        check=False,
    )
    assert result.returncode == 2
    assert "fp16 needs a GPU" in result.stderr


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
    # --resume PATH: an older checkpoint, into a new folder, given relative to the working directory
    older = out / "checkpoints" / "step_00000009"
    relative = os.path.relpath(older, REPO)
    saved = json.loads((older / "state.json").read_text())["run_state"]
    other = tmp_path / "from9"
    started = time.monotonic()
    result = run(launch_command(1, launcher="python") + train_args(other, synthetic_data, "--resume", relative))
    took = time.monotonic() - started
    assert f"resumed from {relative} at step 9" in result.stdout
    assert [m["step"] for m in read_metrics(other) if "train/loss" in m] == list(range(10, 17))
    # the times count every attempt: the checkpoint's, plus this attempt's 7 steps (their time from this attempt's
    # images/s), plus, for the wall time, no more than this process lived
    summary = json.loads((other / "summary.json").read_text())
    this_attempt = 7 * 32 / summary["images_per_second"]
    assert summary["train_seconds"] == pytest.approx(saved["train_seconds"] + this_attempt, rel=1e-9)
    assert saved["train_seconds"] > 0 and saved["wall_seconds"] >= saved["train_seconds"]
    assert saved["wall_seconds"] + this_attempt <= summary["wall_seconds"] <= saved["wall_seconds"] + took
    # --resume never: from scratch although checkpoints are there
    result = run(launch_command(1, launcher="python") + train_args(out, synthetic_data, "--resume", "never"))
    assert "resumed" not in result.stdout
    assert json.loads((out / "summary.json").read_text())["global_step"] == 16
    # a new run in the folder: its own metrics.jsonl; the earlier run's rows kept beside it, as they were
    assert [m["step"] for m in read_metrics(out) if "train/loss" in m] == list(range(1, 17))
    assert f"the earlier run's metrics.jsonl is kept as {out / 'metrics.1.jsonl'}" in result.stderr
    earlier = [json.loads(line) for line in (out / "metrics.1.jsonl").read_text().splitlines()]
    assert [row["step"] for row in earlier if "train/loss" in row] == steps
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
    # a different data config or seed would be refused for a plain resume; weights_only takes the weights and starts
    # at step 1
    changed = ("--data.train_limit", "128", "--train.seed", "1", "--resume", str(source))
    refused = run(launch_command(1, launcher="python") + train_args(second, synthetic_data, *changed), check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    # another seed is another data order: refused like the data, every difference named
    assert "data.train_limit (checkpoint 0, now 128); train.seed (checkpoint 0, now 1)" in refused.stderr
    result = run(
        launch_command(1, launcher="python")
        + train_args(second, synthetic_data, *changed, "--checkpoint.weights_only", "true")
    )
    assert f"resumed from {source} at step 8 (weights only)" in result.stdout
    losses = {m["step"]: m["train/loss"] for m in read_metrics(second) if "train/loss" in m}
    assert sorted(losses) == list(range(1, 9))  # 128 images / 32 = 4 steps per epoch, 2 epochs
    fresh = tmp_path / "fresh"
    run(launch_command(1, launcher="python") + train_args(fresh, synthetic_data, *changed[:4]))
    fresh_losses = {m["step"]: m["train/loss"] for m in read_metrics(fresh) if "train/loss" in m}
    assert losses[1] < 0.8 * fresh_losses[1]  # the first step already has trained weights


def test_keep_best_tensorboard_data_file_and_val_size(tmp_path, synthetic_data):
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
            "--checkpoint.every_steps",
            "2",
            # the third epoch at 30 times the rate: the network forgets, so the best evaluation is not the last one
            "--optim.schedule",
            "step",
            "--optim.step_epochs",
            "2",
            "--optim.step_gamma",
            "30",
            "--tracking.report_to",
            "tensorboard",
            # fp32 whatever the CPU: in bf16 (a CPU with AVX-512-BF16) the third epoch did not forget
            "--train.mixed_precision",
            "no",
        )
    )
    # --data.path FILE (train only) + val_size: 200 training images, 56 held out for evaluation
    assert "200 train / 56 validation images" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_split"] == "validation" and summary["eval_samples"] == 56
    # keep 1 + keep_best, after saves every 2 steps and at each epoch end (6, 12, 18): the newest, and the best by
    # eval accuracy (the newest of equals), which is not the newest
    evals = [(m["eval/accuracy"], m["step"]) for m in read_metrics(out) if "eval/accuracy" in m]
    assert [step for _, step in evals] == [6, 12, 18]
    best_step = max(evals)[1]
    assert best_step != 18, f"the last evaluation is the best ({evals}): keep_best would only keep the newest"
    assert _checkpoint_steps(out) == [best_step, 18]
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
    saved = json.loads((out / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert saved["run_state"]["tracker_run_id"] == run_id
    # the id must come from the checkpoint itself: OUTPUT_DIR/tracker_run_id (a run killed before its first
    # checkpoint continues through that file) is gone, as when only the checkpoints were copied to another machine
    (out / "tracker_run_id").unlink()
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


def _cores_of_this_process() -> int:
    """What the test process may run on, read here independently of distcifar.hardware: its affinity, capped by a
    cgroup v2 CPU quota where there is one."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 file, or "max": no quota
        pass
    return cores


def test_bare_accelerate_launch_trains_on_the_cores_it_has_and_keeps_a_thread_count_the_user_chose(
    tmp_path, synthetic_data
):
    # `accelerate launch distcifar/train.py` with no Accelerate config and no --cpu sets OMP_NUM_THREADS=1 for its
    # worker (a default meant for GPU machines). HF_HOME points at an empty folder so that no default config of
    # this machine's (`accelerate config default`) is found: this is the launch of a new user.
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_RANK")}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    bare = [ACCELERATE, "launch", "distcifar/train.py"]
    args = ["--train.max_steps", "2", "--tracking.plots", "false"]
    cores = _cores_of_this_process()
    result = run(bare + train_args(tmp_path / "bare", synthetic_data, *args), env=env)
    header = re.search(r"\(DistributedType\.NO, (\d+) threads: ([^)]*)\)", result.stdout)
    assert header, result.stdout[:2000]
    assert int(header[1]) == cores and header[2] == f"cores available to this process: {cores}", header[0]
    # the user's count, set before the launcher, is kept (here 1, which the launcher's default also is)
    chosen = run(bare + train_args(tmp_path / "chosen", synthetic_data, *args), env={**env, "OMP_NUM_THREADS": "1"})
    assert "(DistributedType.NO, 1 threads: OMP_NUM_THREADS=1 set before the launcher)" in chosen.stdout
