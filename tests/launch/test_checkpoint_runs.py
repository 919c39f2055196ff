"""Checkpoints with real processes: an exact resume after SIGKILL (1 and 2 processes, with accumulation, with the
weight average), a resume on another number of processes, SIGTERM to every rank (each exits 143 after saving that
step), and the exported model through evaluate.py. The in-process checkpoint tests are in
tests/unit/test_checkpoint.py."""

import contextlib
import json
import os
import re
import signal
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from distcifar.config import ModelConfig
from distcifar.files import read_jsonl
from distcifar.model import DistCifarNet
from distcifar.tracking import ATTEMPTS_FILE
from support import kill_tree, launch_command, probe, read_metrics, run, start, train_args, worker_exit_codes

# ---------------------------------------------------------------------------------------------
# Exact resume with real processes


def _kill_after_checkpoint(command, folder, timeout=240, env=None):
    """Run until `folder` (a checkpoint) appears, then SIGKILL the launch, workers included. The workers are known
    before the checkpoint appears, so the kill lands within milliseconds of it."""
    process = start(command, env)
    deadline, family = time.monotonic() + timeout, []
    while not (folder / "manifest.json").exists():
        assert process.poll() is None, f"run ended before {folder.name}:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        with contextlib.suppress(psutil.Error):
            family = psutil.Process(process.pid).children(recursive=True) or family
        time.sleep(0.002)
    for worker in family:
        with contextlib.suppress(psutil.Error):
            worker.send_signal(signal.SIGKILL)
    kill_tree(process.pid, signal.SIGKILL)
    process.wait()
    assert not (folder.parent.parent / "summary.json").exists()


def _weights(out):
    return load_file(out / "final" / "model.safetensors")


EVAL_KEYS = ("eval/accuracy", "eval/loss", "eval/raw_accuracy", "eval/raw_loss")


def _evaluations(out) -> dict:
    """Each evaluated step's figures, the last attempt's where a resumed run logged a step twice."""
    return {m["step"]: [m.get(key) for key in EVAL_KEYS] for m in read_metrics(out) if "eval/accuracy" in m}


def _assert_same_run(straight, resumed, resumed_at: int):
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    after = lambda out: {s: e for s, e in _evaluations(out).items() if s > resumed_at}  # noqa: E731
    assert after(resumed) == after(straight) and after(straight)  # every evaluation the resumed attempt made
    summary = lambda out: json.loads((out / "summary.json").read_text())  # noqa: E731
    for key in ("test_accuracy", "test_loss", "test_accuracy_raw", "global_step"):
        assert summary(resumed).get(key) == summary(straight).get(key), key


AVERAGED = ["--train.ema_decay", "0.9", "--train.eval_every_epochs", "0.5"]  # evaluations at steps 4, 8, 12, 16


@pytest.mark.parametrize(
    "processes, extra",
    [
        (1, []),
        (1, ["--train.grad_accum_steps", "2", *AVERAGED]),
        (2, ["--train.grad_accum_steps", "2", *AVERAGED]),
    ],
    ids=["1proc", "1proc-accum2-ema", "2proc-accum2-ema"],
)
def test_killed_run_resumes_bit_identical(tmp_path, synthetic_data, processes, extra):
    # 8 steps per epoch, 2 epochs; the kill lands right after the mid-epoch checkpoint at step 5.
    args = ["--checkpoint.every_steps", "5", "--model.dropout", "0.5", *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(launch_command(processes) + train_args(straight, synthetic_data, *args))
    # The killed attempt is train.py holding still after step 6 (rank 0 stops answering before the checkpointer
    # sees that step; another rank then waits in step 7's all-reduce), so no later checkpoint can land before the
    # kill: on a loaded machine a tiny run once reached its step-8 save first (CI: resumed from step 8).
    hold = {**os.environ, "PROBE_FAIL_RANK": "0", "PROBE_FAIL_STEP": "6", "PROBE_HANG": "1"}
    _kill_after_checkpoint(
        launch_command(processes, script=probe("instrumented_train")) + train_args(resumed, synthetic_data, *args),
        resumed / "checkpoints" / "step_00000005",
        env=hold,
    )
    result = run(launch_command(processes) + train_args(resumed, synthetic_data, *args))
    # from the mid-epoch checkpoint (step 5 of 8 in epoch 1), not an epoch end and not from scratch
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000005'} at step 5" in result.stdout
    assert [m["step"] for m in read_metrics(resumed) if "train/loss" in m][-11:] == list(range(6, 17))
    _assert_same_run(straight, resumed, resumed_at=5)
    steps = [m["step"] for m in read_metrics(resumed) if "train/loss" in m]
    assert steps[-1] == 16
    if "--train.ema_decay" in extra:  # final/ holds the average, the checkpoint both it and the training weights
        assert sorted(_evaluations(straight)) == [4, 8, 12, 16]
        last = resumed / "checkpoints" / "step_00000016"
        averaged, trained = load_file(last / "ema.safetensors"), load_file(last / "model.safetensors")
        exported = _weights(resumed)
        assert all(torch.equal(averaged[f"module.{k}"], v) for k, v in exported.items())
        assert not torch.equal(trained["classifier.2.weight"], exported["classifier.2.weight"])
        summary = json.loads((resumed / "summary.json").read_text())
        assert summary["test_accuracy"] == _evaluations(resumed)[16][0]  # the average's, not the training weights'
        assert summary["test_accuracy_raw"] == _evaluations(resumed)[16][2] and summary["ema_decay"] == 0.9


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
            # the ranks agree on a signal at the next step, so one signalled first may already have stopped the
            # other (a loaded machine can hold this loop that long, as CI once did): the exit codes below still hold
            with contextlib.suppress(psutil.NoSuchProcess):
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
    # attempts.jsonl, one line per start and end, the main process's only: the second attempt began where the first
    # saved its last checkpoint
    starts_and_ends = [
        (row["attempt"], row.get("from_step"), row.get("at_step"), row.get("exit_code"))
        for row in read_jsonl(out / ATTEMPTS_FILE)
    ]
    assert starts_and_ends == [(1, 0, None, None), (1, None, step, 143), (2, step, None, None), (2, None, 24, 0)]


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
