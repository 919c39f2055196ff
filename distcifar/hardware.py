"""What the run is on: the device's name, the precision it runs natively, the CPU threads it computes with, and
waiting for its queued work."""

from __future__ import annotations

import math
import os
from pathlib import Path

import psutil
import torch
from accelerate import Accelerator


def resolve_precision(requested: str, on_gpu: bool) -> str:
    """train.mixed_precision with `auto` decided: bf16 where the hardware runs it natively, else fp16 + loss
    scaling on a GPU (a T4 or V100 emulates bf16, slowly) and fp32 on a CPU (emulated bf16 there is ~10x slower)."""
    if requested != "auto":
        return requested
    if on_gpu:
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def wait_for_device(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock read next counts work done rather than work queued."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def hardware(accelerator: Accelerator) -> dict:
    """What the run is on, for the tracker's run config and the benchmark's report."""
    return {
        "device": str(accelerator.device),
        "device_name": device_name(accelerator.device),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
    }


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo ("cpu" where there is none)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "cpu")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_threads() -> tuple[int, str]:
    """(threads, why) for a run on the CPU: the user's OMP_NUM_THREADS or --num_cpu_threads_per_process when they
    chose one, else the cores this process may use divided among the processes on its node. A launcher's own
    default is no choice: `accelerate launch` without a config or --cpu gives each process 1 thread (a default
    meant for GPU machines), as torchrun does with several processes. A pure function of the environment, so the
    run's header can say what build_accelerator set."""
    chosen = _users_thread_count()
    if chosen:
        return chosen
    cores, local = available_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    why = f"cores available to this process: {cores}" + (f", shared by {local} processes" if local > 1 else "")
    return max(1, cores // local), why


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup's CPU quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_quota_cores()
    return min(cores, quota) if quota else cores


def _cgroup_quota_cores() -> int | None:
    """The CPU quota of this process's cgroup in cores, rounded up (cgroup v2's cpu.max "QUOTA PERIOD", or v1's
    two files); None where there is none ("max", -1, or no such file)."""
    for files in (
        ["/sys/fs/cgroup/cpu.max"],
        ["/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"],
    ):
        try:
            quota, period = (int(value) for value in " ".join(Path(f).read_text() for f in files).split())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            return max(1, math.ceil(quota / period))
    return None


def _users_thread_count() -> tuple[int, str] | None:
    """The thread count the user chose, with how, or None. Outside a launcher an OMP_NUM_THREADS in this process's
    environment is the user's. Under one (LOCAL_RANK, or the ACCELERATE_* variables of accelerate's one-process
    launcher), the launcher is this process's parent: its command line shows --num_cpu_threads_per_process, and
    the environment it was started with shows an OMP_NUM_THREADS the user set before it; otherwise the value is
    the launcher's default. Where the parent cannot be read, the value is taken as the user's."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if not value.isdigit() or int(value) < 1:
        return None
    if "LOCAL_RANK" not in os.environ and "ACCELERATE_USE_CPU" not in os.environ:
        return int(value), f"OMP_NUM_THREADS={value}"
    try:
        launcher = psutil.Process().parent()
        arguments, environment = launcher.cmdline(), launcher.environ()
    except (psutil.Error, AttributeError):  # AttributeError: no parent
        return int(value), f"OMP_NUM_THREADS={value}, set by the user or the launcher (its process cannot be read)"
    if any(a.startswith("--num_cpu_threads_per_process") for a in arguments):
        return int(value), f"the launcher's --num_cpu_threads_per_process {value}"
    if environment.get("OMP_NUM_THREADS"):
        return int(value), f"OMP_NUM_THREADS={value} set before the launcher"
    return None
