"""OUTPUT_DIR/.lock: one run per output folder."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import psutil
from accelerate import Accelerator

from distcifar.errors import UsageError, one_line
from distcifar.ranks import fail_together


class OutputLock:
    """OUTPUT_DIR/.lock: one run per output folder, held by the main process of the run.

    The lock names its host, pid, Slurm job and torch elastic run. A lock is stale, and is taken over, when its
    process is gone (same host), when it belongs to this very Slurm job (a requeue, maybe on another node) or
    elastic run (an in-job restart whose rank 0 is now on another node), or when nobody has refreshed it for
    STALE_S seconds (another host: a heartbeat thread refreshes it every HEARTBEAT_S seconds while the run lives).
    """

    HEARTBEAT_S, STALE_S = 30, 120

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self._stop = threading.Event()
        self._held = False

    def acquire(self, accelerator: Accelerator) -> None:
        """Collective: every rank raises UsageError if the folder cannot be made or written, or another live run
        holds it."""
        problem, folder = None, self.path.parent
        if accelerator.is_main_process:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                holder = self._try_acquire()
            except OSError as err:  # a file in the way, no permission, a read-only filesystem
                problem = (
                    f"cannot use --output_dir {folder}: {err.strerror or one_line(err)} ({err.filename or folder}); "
                    "pass a folder this user can create and write"
                )
            else:
                if holder:
                    problem = (
                        f"{folder} is in use by another run (host {holder['host']}, pid {holder['pid']}, started "
                        f"{holder['started']}); use another --output_dir, or stop that run first"
                    )
        fail_together(accelerator, UsageError, problem)

    def _try_acquire(self) -> dict | None:
        """None when the lock is ours now, else the live holder's record."""
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": psutil.Process().create_time(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "elastic_run_id": _elastic_run_id(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is not None and self._alive(holder):
                    return holder
                self.path.unlink(missing_ok=True)  # stale: a killed run, or this job before its requeue
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            threading.Thread(target=self._heartbeat, daemon=True).start()
            atexit.register(self.release)  # also after an error or a stop signal; a SIGKILL leaves a stale lock
            return None
        return self._read() or {"host": "?", "pid": "?", "started": "?"}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _alive(self, holder: dict) -> bool:
        if holder.get("slurm_job_id") and holder["slurm_job_id"] == os.environ.get("SLURM_JOB_ID"):
            return False
        if holder.get("elastic_run_id") and holder["elastic_run_id"] == _elastic_run_id():
            return False  # the elastic agent restarts a group only once every worker of the old one has ended
        if holder.get("host") == socket.gethostname():
            try:
                process = psutil.Process(holder["pid"])
                return (
                    abs(process.create_time() - holder["pid_started"]) < 1 and process.status() != psutil.STATUS_ZOMBIE
                )  # killed, not yet reaped
            except (psutil.Error, KeyError, TypeError):
                return False
        try:
            return time.time() - self.path.stat().st_mtime < self.STALE_S
        except OSError:
            return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        if self._held:
            self._stop.set()
            self.path.unlink(missing_ok=True)
            self._held = False


def _elastic_run_id() -> str | None:
    """torch elastic's run id: one per torchrun job, whichever attempt (None without one: "none" is the default
    that every job without --rdzv-id shares)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None
