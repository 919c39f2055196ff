"""How many threads a CPU run computes with (hardware.cpu_threads), decided in the pytest process for the cases
that need no launcher; the bare `accelerate launch` and a count set before it are in tests/launch/test_train.py."""

import os
import subprocess
import sys

from distcifar.hardware import available_cores, cpu_threads
from support import REPO


def test_without_a_launcher_an_omp_num_threads_is_the_user_s_and_otherwise_every_available_core(monkeypatch):
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads() == (3, "OMP_NUM_THREADS=3")
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0))
    assert available_cores() <= cores
    assert cpu_threads() == (available_cores(), f"cores available to this process: {available_cores()}")
    monkeypatch.setenv("OMP_NUM_THREADS", "0")  # not a count: ignored
    assert cpu_threads()[0] == available_cores()


# A stand-in launcher: a Python process that starts this worker as accelerate's and torchrun's launchers do, with
# LOCAL_RANK, LOCAL_WORLD_SIZE and OMP_NUM_THREADS=1 added to the environment it hands over.
LAUNCHER = """
import os, subprocess, sys
worker = "from distcifar.hardware import cpu_threads; print(*cpu_threads(), sep='|')"
env = {**os.environ, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
sys.exit(subprocess.run([sys.executable, "-c", worker], env=env).returncode)
"""


def _worker_threads(launcher_env: dict, *launcher_args: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *launcher_args], env=launcher_env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    threads, why = result.stdout.strip().split("|")
    return int(threads), why


def test_a_launcher_s_default_is_replaced_and_a_count_given_to_the_launcher_is_kept():
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "LOCAL_", "ACCELERATE_"))}
    clean["PYTHONPATH"] = str(REPO)
    cores = available_cores()
    assert _worker_threads(clean) == (
        max(1, cores // 2),
        f"cores available to this process: {cores}, shared by 2 processes",
    )
    assert _worker_threads({**clean, "OMP_NUM_THREADS": "1"}) == (1, "OMP_NUM_THREADS=1 set before the launcher")
    given = _worker_threads(clean, "--num_cpu_threads_per_process", "1")
    assert given == (1, "the launcher's --num_cpu_threads_per_process 1")
