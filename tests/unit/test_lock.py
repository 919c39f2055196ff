"""The output-folder lock as another host sees it, in the pytest process: a live run keeps its lock fresh past the
stale limit, the limit is the documented two minutes, and a fresh lock is taken over only within one elastic run.
Two real runs on one folder, killed holders and Slurm requeues are in tests/launch/test_faults.py."""

import json
import os
import socket
import time

import pytest
from accelerate import Accelerator

import distcifar.lock
from distcifar.errors import UsageError
from distcifar.lock import OutputLock


@pytest.fixture
def accelerator(fresh_accelerate_state):
    return Accelerator(cpu=True)


def _elsewhere(monkeypatch):
    """From here on this process looks at locks as a process on another node does: only the file's age counts."""
    monkeypatch.setattr(distcifar.lock.socket, "gethostname", lambda: "node-elsewhere")


def test_a_live_runs_lock_stays_fresh_past_the_stale_limit(tmp_path, accelerator, monkeypatch):
    # The real heartbeat thread, on a shorter time scale: stale after 1 s, refreshed every 0.1 s.
    monkeypatch.setattr(OutputLock, "STALE_S", 1.0)
    monkeypatch.setattr(OutputLock, "HEARTBEAT_S", 0.1)
    holder, here = OutputLock(tmp_path), socket.gethostname()
    holder.acquire(accelerator)
    try:
        _elsewhere(monkeypatch)
        time.sleep(2.5)  # two and a half stale limits
        assert time.time() - (tmp_path / ".lock").stat().st_mtime < 1.0
        with pytest.raises(UsageError, match=f"in use by another run \\(host {here}, pid {os.getpid()}"):
            OutputLock(tmp_path).acquire(accelerator)
        # the same lock left behind by a run whose node died (no more heartbeats): taken over once stale
        holder._stop.set()
        time.sleep(1.5)
        taker = OutputLock(tmp_path)
        taker.acquire(accelerator)
        assert json.loads((tmp_path / ".lock").read_text())["host"] == "node-elsewhere"
        taker.release()
    finally:
        holder.release()


def _lock_from_another_host(folder, age_s: float):
    record = {"host": "node-far", "pid": 4242, "pid_started": 0.0, "slurm_job_id": None, "started": "2026-01-01"}
    (folder / ".lock").write_text(json.dumps(record))
    then = time.time() - age_s
    os.utime(folder / ".lock", (then, then))


def test_another_hosts_lock_is_stale_after_two_minutes_without_a_heartbeat(tmp_path, accelerator):
    # docs/checkpoints.md: taken over when "its run, on another host, has not refreshed it for 2 minutes (a live run
    # refreshes it every 30 s)"
    _lock_from_another_host(tmp_path, age_s=100)
    with pytest.raises(UsageError, match=r"in use by another run \(host node-far, pid 4242"):
        OutputLock(tmp_path).acquire(accelerator)
    _lock_from_another_host(tmp_path, age_s=130)
    lock = OutputLock(tmp_path)
    lock.acquire(accelerator)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert OutputLock.HEARTBEAT_S == 30 and 3 * OutputLock.HEARTBEAT_S <= OutputLock.STALE_S


def _found(tmp_path, **fields) -> tuple[OutputLock, dict]:
    """A fresh lock of a run on another node (refreshed just now), as this run finds it."""
    record = {"host": "node-elsewhere", "pid": 4242, "pid_started": 0.0, "slurm_job_id": None, **fields}
    (tmp_path / ".lock").write_text(json.dumps(record))
    return OutputLock(tmp_path), record


@pytest.mark.parametrize(
    "ours, theirs, alive",
    [
        ("3f2a-run", "3f2a-run", False),  # an earlier attempt of this elastic run: its group is gone
        ("3f2a-run", "77aa-other", True),  # another elastic run's, fresh: respected
        ("none", "none", True),  # torchrun's default run id, shared by every job without --rdzv-id: no proof
        (None, None, True),
    ],
)
def test_a_fresh_lock_from_another_node_is_taken_over_only_within_one_elastic_run(
    tmp_path, monkeypatch, ours, theirs, alive
):
    if ours is None:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    else:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", ours)
    lock, record = _found(tmp_path, elastic_run_id=theirs)
    assert time.time() - (tmp_path / ".lock").stat().st_mtime < OutputLock.STALE_S
    assert lock._alive(record) is alive
