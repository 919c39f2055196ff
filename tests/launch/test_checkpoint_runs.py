"""Checkpoints with real processes: an exact resume after SIGKILL (1 and 2 processes, with accumulation), a
resume on another number of processes, SIGTERM to every rank (each exits 143 after saving that step), and the
exported model through evaluate.py. The in-process checkpoint tests are in tests/unit/test_checkpoint.py."""

import json
import re
import signal
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from distcifar.config import ModelConfig
from distcifar.model import DistCifarNet
from support import kill_tree, launch_command, read_metrics, run, start, train_args, worker_exit_codes

# ---------------------------------------------------------------------------------------------
# Exact resume with real processes


def _kill_after_checkpoint(command, folder, timeout=240):
    """Run until `folder` (a checkpoint) appears, then SIGKILL the whole process group."""
    process = start(command)
    deadline = time.monotonic() + timeout
    while not (folder / "manifest.json").exists():
        assert process.poll() is None, f"run ended before {folder.name}:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    kill_tree(process.pid, signal.SIGKILL)
    process.wait()
    assert not (folder.parent.parent / "summary.json").exists()


def _weights(out):
    return load_file(out / "final" / "model.safetensors")


def _assert_same_run(straight, resumed):
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    evals = lambda out: [
        (m["step"], m["eval/accuracy"], m["eval/loss"]) for m in read_metrics(out) if "eval/accuracy" in m
    ]  # noqa: E731
    assert evals(resumed)[-1] == evals(straight)[-1]
    summary = lambda out: json.loads((out / "summary.json").read_text())  # noqa: E731
    assert summary(resumed)["test_accuracy"] == summary(straight)["test_accuracy"]
    assert summary(resumed)["global_step"] == summary(straight)["global_step"]


@pytest.mark.parametrize(
    "processes, extra",
    [
        (1, []),
        (1, ["--train.grad_accum_steps", "2"]),
        (2, ["--train.grad_accum_steps", "2"]),
    ],
    ids=["1proc", "1proc-accum2", "2proc-accum2"],
)
def test_killed_run_resumes_bit_identical(tmp_path, synthetic_data, processes, extra):
    # 8 steps per epoch, 2 epochs; the kill lands right after the mid-epoch checkpoint at step 5.
    args = ["--checkpoint.every_steps", "5", "--model.dropout", "0.5", *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(launch_command(processes) + train_args(straight, synthetic_data, *args))
    _kill_after_checkpoint(
        launch_command(processes) + train_args(resumed, synthetic_data, *args),
        resumed / "checkpoints" / "step_00000005",
    )
    result = run(launch_command(processes) + train_args(resumed, synthetic_data, *args))
    # from the mid-epoch checkpoint (step 5 of 8 in epoch 1), not an epoch end and not from scratch
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000005'} at step 5" in result.stdout
    assert [m["step"] for m in read_metrics(resumed) if "train/loss" in m][-11:] == list(range(6, 17))
    _assert_same_run(straight, resumed)
    steps = [m["step"] for m in read_metrics(resumed) if "train/loss" in m]
    assert steps[-1] == 16


def test_resume_on_a_different_number_of_processes(tmp_path, synthetic_data):
    out = tmp_path / "run"
    args = ["--checkpoint.every_steps", "5"]
    _kill_after_checkpoint(
        launch_command(2) + train_args(out, synthetic_data, *args), out / "checkpoints" / "step_00000005"
    )
    result = run(launch_command(1) + train_args(out, synthetic_data, *args))
    assert "resumed from" in result.stdout and "1 process(es)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 16 and summary["num_processes"] == 1
    train_steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert train_steps[-11:] == list(range(6, 17))  # continued from the sample position of step 5


def test_sigterm_to_every_rank_saves_that_step_exits_143_on_each_and_resume_finishes(tmp_path, synthetic_data):
    # SIGTERM to the two training processes only (as `kill PID` does): each rank saves the step they agree on and exits
    # 128 + 15; the launcher, not signalled itself, reports each worker's exit code and exits 1 (had the workers
    # exited 0, it would report success).
    out = tmp_path / "run"
    command = launch_command(2) + train_args(out, synthetic_data, "--train.epochs", "3")
    process = start(command)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 3:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    try:  # the workers: the launcher's children that it gave a LOCAL_RANK
        workers = [child for child in psutil.Process(process.pid).children(recursive=True) if _local_rank(child)]
        assert len(workers) == 2, [child.cmdline() for child in workers]
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        kill_tree(process.pid)  # nothing of a failed test keeps running
    assert process.returncode == 1, output[-3000:]  # a worker that failed: the launcher's own code
    assert worker_exit_codes(output) == {0: 143, 1: 143}, output[-3000:]
    stopped = re.search(r"stopped by signal 15 at step (\d+)", output)
    assert stopped, output[-3000:]
    step = int(stopped.group(1))
    assert 3 <= step < 24
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert saved[-1].name == f"step_{step:08d}", saved
    assert read_metrics(out)[-1]["step"] <= step and not (out / "summary.json").exists()
    result = run(launch_command(2) + train_args(out, synthetic_data, "--train.epochs", "3"))
    assert f"resumed from {saved[-1]} at step {step}" in result.stdout
    assert [m["step"] for m in read_metrics(out) if "train/loss" in m][-(24 - step) :] == list(range(step + 1, 25))
    assert json.loads((out / "summary.json").read_text())["global_step"] == 24


def _local_rank(process: psutil.Process) -> str | None:
    try:
        return process.environ().get("LOCAL_RANK")
    except psutil.Error:
        return None


def test_export_and_evaluate_script(tmp_path, synthetic_data):
    out = tmp_path / "run"
    # a trained model (about all synthetic classes right), so that the comparison is not one of one-class answers
    run(
        launch_command(1, launcher="python")
        + train_args(out, synthetic_data, "--train.batch_size", "16", "--train.epochs", "3", "--model.dropout", "0.0")
    )
    summary = json.loads((out / "summary.json").read_text())
    trained = json.loads((out / "confusion.json").read_text())["confusion"]  # train.py's own last evaluation
    assert summary["test_accuracy"] > 0.5
    model = DistCifarNet.from_pretrained(out / "final")
    assert model.config == ModelConfig(**json.loads((out / "final" / "config.json").read_text()))
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pkl", ".pt", ".pth")]
    for target in (out / "final", sorted((out / "checkpoints").glob("step_*"))[-1]):
        report = tmp_path / "eval.json"
        result = run(
            launch_command(2, script="distcifar/evaluate.py")
            + [str(target), "--data.path", str(synthetic_data), "--output", str(report)]
        )
        evaluation = json.loads(report.read_text())
        assert evaluation["eval_samples"] == 101 and evaluation["num_processes"] == 2
        assert evaluation["confusion"] == trained
        assert evaluation["eval_accuracy"] == pytest.approx(summary["test_accuracy"])
        assert evaluation["eval_loss"] == pytest.approx(summary["test_loss"], rel=1e-3)  # bf16 on some CPUs
        assert "confusion (rows: true, columns: predicted)" in result.stdout
