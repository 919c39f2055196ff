"""What the run is on: the device's name, the precision it runs natively, and waiting for its queued work."""

from __future__ import annotations

from pathlib import Path

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
