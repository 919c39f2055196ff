"""Faults a long run meets, each made for real: divergence, a full disk, a foreign or hand-edited
checkpoint, two runs in one folder. Each ends with one clear line and the right exit code, and no good
checkpoint is lost; with 2 processes every rank stops and none waits for the collective timeout."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save_file

from distcifar.checkpoint_format import read_verified
from distcifar.errors import EXIT_CODE_FILE
from support import kill_tree, launch_command, read_metrics, run, start, train_args, worker_exit_codes

QUICK_FAIL = ("--train.collective_timeout_s", "120")  # a hang would show as a run far longer than this test allows


def _launch(processes):
    """1 process: train.py itself, whose exit code is the contract. 2: accelerate launch, which turns
    any failure of its workers into its own exit code 1 (and a traceback of its own)."""
    return launch_command(1, launcher="python") if processes == 1 else launch_command(processes)


@pytest.fixture(autouse=True)
def exit_code_file(tmp_path, monkeypatch):
    """Where train.py's main process writes its exit code (slurm/train.sh's hook; every launch here inherits it)."""
    path = tmp_path / "exit-code"
    monkeypatch.setenv(EXIT_CODE_FILE, str(path))
    return path


def _assert_exit(result, processes, code):
    """train.py's own exit code: the process's with 1 process; with 2, the launcher's is 1, so train.py's is read from
    the main process's exit-code file and from the launcher's record of its workers (a worker the launcher stopped
    itself, after the other had failed, shows -15 there)."""
    written = Path(os.environ[EXIT_CODE_FILE])
    assert written.read_text() == f"{code}\n", result.stderr[-3000:]
    written.unlink()  # the next failure in the same test writes it afresh
    if processes == 1:
        assert result.returncode == code, result.stderr[-3000:]
    else:
        workers = worker_exit_codes(result.stderr)
        assert result.returncode == 1 and set(workers) == {0, 1}, result.stderr[-3000:]
        assert code in workers.values() and set(workers.values()) <= {code, -15}, workers
    assert "distcifar/" not in "".join(line for line in result.stderr.splitlines() if line.lstrip().startswith("File "))


def _error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def _steps(out):
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))


def _rewrite(folder, name, data: bytes):
    """Replace one file of a checkpoint and keep its manifest consistent, as a careful hand-edit would."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("processes", [1, 2])
def test_divergence_stops_before_a_save_and_keeps_the_last_finite_checkpoint(tmp_path, synthetic_data, processes):
    out = tmp_path / "run"
    started = time.monotonic()
    result = run(
        _launch(processes)
        + train_args(out, synthetic_data, "--optim.lr", "100000000.0", "--checkpoint.every_steps", "1", *QUICK_FAIL),
        check=False,
    )
    _assert_exit(result, processes, 1)
    assert time.monotonic() - started < 100
    errors = _error_lines(result)
    assert len(errors) == 1, errors  # said once, also with 2 processes
    assert "diverged" in errors[0] and "optim.lr" in errors[0] and "optim.grad_clip" in errors[0]
    assert not (out / "summary.json").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))
    saved = _steps(out)
    assert saved, "the steps before the divergence were saved"
    for step in saved:  # nothing non-finite was ever written
        weights = load_file(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def _mount_tmpfs(folder, size_bytes):
    folder.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root needed): {mounted.stderr.strip()}")


@pytest.mark.parametrize("processes", [1, 2])
def test_a_full_disk_while_saving_loses_nothing_and_resume_works_once_space_is_freed(
    tmp_path, synthetic_data, processes
):
    args = ("--checkpoint.keep", "3", *QUICK_FAIL)
    reference = tmp_path / "reference"
    run(launch_command(1, launcher="python") + train_args(reference, synthetic_data, "--train.epochs", "1", *args))
    size = sum(f.stat().st_size for f in (reference / "checkpoints" / "step_00000008").iterdir())
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    _mount_tmpfs(checkpoints, int(size * 1.5))  # room for the epoch-1 checkpoint, not for the epoch-2 one
    try:
        result = run(_launch(processes) + train_args(out, synthetic_data, *args), check=False)
        _assert_exit(result, processes, 1)
        errors = _error_lines(result)
        assert errors and "could not write checkpoint step_00000016" in errors[0], result.stderr[-3000:]
        assert str(checkpoints) in errors[0] and "MB" in errors[0] and "No space left on device" in errors[0]
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000008"]  # no half-written folder left
        read_verified(checkpoints / "step_00000008")  # intact
        subprocess.run(["mount", "-o", f"remount,size={size * 10}", str(checkpoints)], check=True)
        resumed = run(_launch(processes) + train_args(out, synthetic_data, *args))
        assert "resumed from" in resumed.stdout and "step_00000008 at step 8" in resumed.stdout
        assert json.loads((out / "summary.json").read_text())["global_step"] == 16
    finally:
        subprocess.run(["umount", "-l", str(checkpoints)])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_data):
    out = tmp_path_factory.mktemp("finished") / "run"
    run(launch_command(1, launcher="python") + train_args(out, synthetic_data, "--train.epochs", "1"))
    return out


def _edited_copy(finished_run, tmp_path, edit):
    folder = tmp_path / "edited" / "step_00000008"
    shutil.copytree(finished_run / "checkpoints" / "step_00000008", folder)
    edit(folder)
    return folder


def _wrong_shape(folder):
    tensors = load((folder / "model.safetensors").read_bytes())
    tensors["blocks.2.skip.weight"] = torch.zeros(3, 3, 1, 1)
    save_file(tensors, folder / "model.safetensors")
    _rewrite(folder, "model.safetensors", (folder / "model.safetensors").read_bytes())


def _missing_tensor(folder):
    tensors = load((folder / "model.safetensors").read_bytes())
    del tensors["classifier.2.bias"]
    save_file(tensors, folder / "model.safetensors")
    _rewrite(folder, "model.safetensors", (folder / "model.safetensors").read_bytes())


def _missing_field(folder):
    state = json.loads((folder / "state.json").read_text())
    del state["world_size"]
    _rewrite(folder, "state.json", json.dumps(state).encode())


@pytest.mark.parametrize(
    "edit, message",
    [
        (_wrong_shape, "tensor 'blocks.2.skip.weight' has shape (3, 3, 1, 1), the model expects"),
        (_missing_tensor, "model.safetensors has no tensor 'classifier.2.bias'"),
        (_missing_field, "state.json has no field 'world_size'"),
    ],
    ids=["wrong-shape", "missing-tensor", "missing-field"],
)
@pytest.mark.parametrize("processes", [1, 2])
def test_a_foreign_or_hand_edited_checkpoint_is_one_clear_error(
    finished_run, tmp_path, synthetic_data, edit, message, processes
):
    folder = _edited_copy(finished_run, tmp_path, edit)
    result = run(
        _launch(processes) + train_args(tmp_path / "run", synthetic_data, "--resume", str(folder), *QUICK_FAIL),
        check=False,
    )
    _assert_exit(result, processes, 2)
    errors = _error_lines(result)
    assert errors and str(folder) in errors[0] and message in errors[0], result.stderr[-3000:]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_second_run_in_the_same_folder_is_refused_until_the_first_is_gone(tmp_path, synthetic_data, processes):
    out = tmp_path / "run"
    args = ("--train.epochs", "300", "--checkpoint.every_steps", "2", *QUICK_FAIL)  # still running when refused
    first = start(_launch(processes) + train_args(out, synthetic_data, *args), separate_stderr=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step_*")):
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.1)
        holder = json.loads((out / ".lock").read_text())
        second = run(_launch(processes) + train_args(out, synthetic_data, *args), check=False, timeout=120)
        _assert_exit(second, processes, 2)
        error = _error_lines(second)[0]
        assert f"{out} is in use by another run (host {socket.gethostname()}, pid {holder['pid']}" in error
        assert first.poll() is None  # the first run goes on
    finally:
        kill_tree(first.pid)  # SIGKILL, workers included: its lock stays behind, stale
        first.wait()
    assert (out / ".lock").exists()
    resumed = run(_launch(processes) + train_args(out, synthetic_data, *args, "--train.max_steps", "40"))
    assert "resumed from" in resumed.stdout
    assert not (out / ".lock").exists()  # released at the end


def _plant_lock(out, **fields):
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "host": "node-elsewhere",
        "pid": 4242,
        "pid_started": 0.0,
        "slurm_job_id": None,
        "started": "2026-01-01 00:00:00",
        **fields,
    }
    (out / ".lock").write_text(json.dumps(record))


def test_a_lock_from_another_host_is_respected_while_fresh_and_taken_over_when_stale_or_requeued(
    tmp_path, synthetic_data
):
    out = tmp_path / "run"
    args = train_args(out, synthetic_data, "--train.max_steps", "2")
    _plant_lock(out)  # fresh: another node's run is alive
    refused = run(launch_command(1, launcher="python") + args, check=False)
    assert refused.returncode == 2 and "host node-elsewhere, pid 4242" in refused.stderr
    stale = time.time() - 600  # nobody refreshed it for 10 minutes: that node's run is gone
    os.utime(out / ".lock", (stale, stale))
    run(launch_command(1, launcher="python") + args)
    # a requeued Slurm job starts on another node: the lock of its own earlier start is not a rival
    _plant_lock(out, slurm_job_id="777")
    run(launch_command(1, launcher="python") + args + ["--resume", "never"], env={**os.environ, "SLURM_JOB_ID": "777"})
    assert len([m for m in read_metrics(out) if "train/loss" in m]) == 2  # a new run's own (the earlier one's beside)
