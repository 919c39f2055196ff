"""What N processes buy: the bytes DDP all-reduces per optimizer step, and a small model of data-parallel
efficiency from them, the link's bandwidth and a measured step time.

The model (benchmark.py prints it with --predict; README "Scaling" tabulates it):

  payload      P = the gradient bytes each process hands to the all-reduce per optimizer step: fp32
               gradients of every trained parameter (4 bytes each), halved by the fp16/bf16 hooks,
               and for PowerSGD (after its warm-up) (rows + cols) x rank per matrix-shaped gradient
               that is worth compressing, the rest uncompressed (gradient_bytes below)
  traffic      a ring all-reduce sends and receives 2 (N-1)/N x P bytes per process
  t_comm       = 2 (N-1)/N x P / B  +  2 (N-1) x buckets x latency, where B is the bandwidth of the slowest
               link in the ring (NVLink inside a node; the network adapter between nodes) and buckets =
               ceil(P / ddp.bucket_cap_mb)
  t_compute    the optimizer step of one process without gradient communication: the benchmark's
               no-sync step (N > 1), or its training step (1 process: no DDP, no communication)
  efficiency   = t_compute / (t_compute + t_comm): no overlap of communication with the backward pass.
               DDP does overlap its buckets with the backward pass, so this is the pessimistic end; the
               optimistic one, full overlap, would be t_compute / max(t_compute, t_comm)
  accumulation the smallest k with t_comm / (k t_compute + t_comm) <= target (default 20%): k micro-batches
               per all-reduce (train.grad_accum_steps, or a k times larger per-GPU batch where it fits
               and the step time grows linearly with the batch)

Not modelled: contention of several GPUs for one network adapter (give B per GPU then), NCCL's
tree algorithms, stragglers, and the data pipeline (on the device here, and far from the limit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distcifar.hardware import wait_for_device

# Effective all-reduce bandwidth (GB/s, 1e9 bytes) of the slowest link in the ring and its per-message
# latency. Line rates for the networks (NCCL reaches roughly 80-95% of them); NVLink: H100 SXM
# NVLink 4 as NCCL's all-reduce bus bandwidth commonly measures it on 8 GPUs.
LINKS: dict[str, tuple[float, float, str]] = {
    "nvlink": (370.0, 5e-6, "NVLink 4 inside an H100 node (~370 GB/s all-reduce bus bandwidth)"),
    "ib-ndr": (50.0, 10e-6, "InfiniBand NDR, 400 Gb/s per GPU"),
    "ib-hdr": (25.0, 10e-6, "InfiniBand HDR, 200 Gb/s per GPU"),
    "eth-100g": (12.5, 30e-6, "100 Gb/s Ethernet"),
    "eth-25g": (3.125, 30e-6, "25 Gb/s Ethernet"),
}

GRADIENT_BYTES = 4  # the parameters, so the gradients DDP reduces, stay fp32 under autocast


def gradient_bytes(
    parameters, comm_hook: str = "none", powersgd_rank: int = 1, min_compression_rate: float = 2.0
) -> int:
    """Bytes one process hands to DDP's all-reduce per optimizer step (see the module docstring).

    PowerSGD as torch's powerSGD_hook does it after its warm-up: each gradient of 2+ dimensions viewed as
    (shape[0], rest) is sent as P (rows x rank) and Q (cols x rank) when that is min_compression_rate times
    smaller, else whole; 1-D gradients (biases, BatchNorm) whole. batched_powersgd treats each bucket as one
    square matrix instead; here it is counted as if the whole gradient were one bucket."""
    shapes = [tuple(p.shape) for p in parameters if p.requires_grad]
    numel = sum(math.prod(shape) for shape in shapes)
    if comm_hook in ("fp16", "bf16"):
        return numel * 2
    if comm_hook == "powersgd":
        elements = 0
        for shape in shapes:
            rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (0, 0)
            compressed = (rows + cols) * powersgd_rank
            elements += (
                compressed if len(shape) > 1 and compressed * min_compression_rate < rows * cols else math.prod(shape)
            )
        return elements * GRADIENT_BYTES
    if comm_hook == "batched_powersgd":
        side = math.ceil(math.sqrt(numel))
        return 2 * side * powersgd_rank * GRADIENT_BYTES
    return numel * GRADIENT_BYTES


def ring_bytes(payload: float, processes: int) -> float:
    """Bytes each process sends (and receives) in a ring all-reduce of `payload` bytes."""
    return 2 * (processes - 1) / processes * payload


@dataclass
class Prediction:
    processes: int
    bandwidth_gbps: float  # GB/s
    latency_s: float
    compute_seconds: float
    comm_seconds: float
    efficiency: float  # no overlap
    communication_share: float
    accumulation_for_target: int  # smallest k keeping communication_share <= target
    target: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def predict(
    compute_seconds: float,
    payload: float,
    processes: int,
    bandwidth_gbps: float,
    latency_s: float = 0.0,
    bucket_bytes: float = 25 * 2**20,
    target: float = 0.2,
) -> Prediction:
    """The model of the module docstring for one N and one link."""
    if processes < 1 or bandwidth_gbps <= 0 or compute_seconds <= 0 or not 0 < target < 1:
        raise ValueError("processes >= 1, bandwidth > 0, compute time > 0 and 0 < target < 1 are needed")
    buckets = max(1, math.ceil(payload / bucket_bytes))
    comm = ring_bytes(payload, processes) / (bandwidth_gbps * 1e9) + 2 * (processes - 1) * buckets * latency_s
    share = comm / (compute_seconds + comm)
    # t_comm / (k t_compute + t_comm) <= target  <=>  k >= t_comm (1 - target) / (target t_compute)
    accumulation = max(1, math.ceil(comm * (1 - target) / (target * compute_seconds) - 1e-9))
    return Prediction(
        processes,
        bandwidth_gbps,
        latency_s,
        compute_seconds,
        comm,
        compute_seconds / (compute_seconds + comm),
        share,
        accumulation,
        target,
    )


def parse_link(text: str) -> tuple[str, float, float]:
    """(name, GB/s, latency s) from a LINKS name or a number of GB/s (latency 0)."""
    if text in LINKS:
        bandwidth, latency, _ = LINKS[text]
        return text, bandwidth, latency
    try:
        bandwidth = float(text)
    except ValueError:
        raise ValueError(f"a bandwidth is a number of GB/s or one of {', '.join(LINKS)}; got {text!r}") from None
    if not bandwidth > 0:
        raise ValueError(f"a bandwidth must be > 0 GB/s, got {text!r}")
    return f"{bandwidth:g} GB/s", bandwidth, 0.0


def prediction_table(
    compute_seconds: float,
    payload: float,
    processes: list[int],
    links: list[str],
    bucket_bytes: float = 25 * 2**20,
    target: float = 0.2,
) -> tuple[list[dict], str]:
    """Rows for every (link, N), and the same as a printable table."""
    rows, lines = (
        [],
        [
            f"predicted scaling: {compute_seconds * 1e3:.1f} ms compute per optimizer step and process, "
            f"{payload / 1e6:.1f} MB all-reduced per step; no overlap of communication with backward (pessimistic)",
            f"  {'link':<12} {'GB/s':>7} {'N':>4} {'comm ms':>9} {'efficiency':>10} {'comm share':>10}   "
            f"accumulation for <= {target:.0%}",
        ],
    )
    for link in links:
        name, bandwidth, latency = parse_link(link)
        for n in processes:
            p = predict(compute_seconds, payload, n, bandwidth, latency, bucket_bytes, target)
            rows.append({"link": name, **p.as_dict()})
            lines.append(
                f"  {name:<12} {bandwidth:>7.1f} {n:>4} {p.comm_seconds * 1e3:>9.2f} {p.efficiency:>10.2f} "
                f"{p.communication_share:>10.1%}   {p.accumulation_for_target}"
            )
    return rows, "\n".join(lines)


def measure_all_reduce(payload_bytes: int, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of one all-reduce of `payload_bytes` (fp32) over the default process group."""
    import statistics
    import time

    import torch.distributed as dist

    buffer = torch.zeros(max(1, payload_bytes // 4), dtype=torch.float32, device=device)
    dist.all_reduce(buffer)  # warm-up: connections, allocations
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        wait_for_device(device)
        started = time.perf_counter()
        dist.all_reduce(buffer)
        wait_for_device(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)
