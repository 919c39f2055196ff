"""What N processes buy: the benchmark over several process counts, and a model of data-parallel efficiency.

    python scripts/scaling.py --processes 1,2,3 [--predict 2,8,64] [--bandwidth nvlink,ib-ndr,12.5] [--target 0.2]
                              [--output scaling.json] [benchmark options: --config FILE, --train.batch_size 192 ...]
    python scripts/scaling.py --step_seconds 0.001 --predict 2,8,64 [--config FILE] [--ddp.comm_hook fp16]

--processes runs `python -m distcifar.benchmark` once per N (N = 1 plainly, N > 1 through `accelerate launch` with
launch/cpu_multi.yaml, or launch/multi_gpu.yaml on a GPU, each with --baseline of the N = 1 run), times one
all-reduce of the fp32 gradient's size on N processes (torchrun), and prints one table; --predict adds the model's
forecast from the measured step time. --step_seconds gives the model a compute time per step instead of measuring.
docs/distributed.md holds the figures this measured and predicted.

The model:

  payload      P = the gradient bytes each process hands to the all-reduce per optimizer step: fp32 gradients of
               every trained parameter, halved by the fp16/bf16 hooks; PowerSGD (after its warm-up) sends
               (rows + cols) x rank per matrix-shaped gradient worth compressing, the rest whole
  t_comm       = 2 (N-1)/N x P / B + 2 (N-1) x buckets x latency: a ring all-reduce over the slowest link's bandwidth
               B (NVLink inside a node, the network adapter between nodes), buckets = ceil(P / ddp.bucket_cap_mb)
  t_compute    the benchmark's no-sync step (N > 1) or training step (1 process): a step without communication
  efficiency   = t_compute / (t_compute + t_comm), no overlap of communication with backward (the pessimistic end)
  accumulation the smallest k with t_comm / (k t_compute + t_comm) <= target: micro-batches per all-reduce
Not modelled: several GPUs sharing one network adapter (give B per GPU), NCCL's trees, stragglers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # distcifar, installed or not

from distcifar import benchmark  # noqa: E402
from distcifar.cli import columns  # noqa: E402
from distcifar.errors import RunFailed, UsageError, entry_point  # noqa: E402
from distcifar.model import DistCifarNet  # noqa: E402

# Effective all-reduce bandwidth (GB/s) of the slowest link in the ring and its per-message latency: line rates for
# the networks (NCCL reaches ~80-95% of them); NVLink as NCCL's all-reduce bus bandwidth measures on 8 H100 SXM.
LINKS: dict[str, tuple[float, float, str]] = {
    "nvlink": (370.0, 5e-6, "NVLink 4 inside an H100 node (~370 GB/s all-reduce bus bandwidth)"),
    "ib-ndr": (50.0, 10e-6, "InfiniBand NDR, 400 Gb/s per GPU"),
    "ib-hdr": (25.0, 10e-6, "InfiniBand HDR, 200 Gb/s per GPU"),
    "eth-100g": (12.5, 30e-6, "100 Gb/s Ethernet"),
    "eth-25g": (3.125, 30e-6, "25 Gb/s Ethernet"),
}
GRADIENT_BYTES = 4  # the parameters, so the gradients DDP reduces, stay fp32 under autocast


def gradient_bytes(parameters, comm_hook: str = "none", powersgd_rank: int = 1, min_compression_rate: float = 2.0):
    """Bytes one process hands to DDP's all-reduce per optimizer step. PowerSGD as torch's powerSGD_hook does it:
    each gradient of 2+ dimensions viewed as (shape[0], rest) is sent as P and Q when that is min_compression_rate
    times smaller, else whole; batched_powersgd treats the whole gradient as one square matrix."""
    shapes = [tuple(p.shape) for p in parameters if p.requires_grad]
    numel = sum(math.prod(shape) for shape in shapes)
    if comm_hook in ("fp16", "bf16"):
        return numel * 2
    if comm_hook == "batched_powersgd":
        return 2 * math.ceil(math.sqrt(numel)) * powersgd_rank * GRADIENT_BYTES
    if comm_hook != "powersgd":
        return numel * GRADIENT_BYTES
    elements = 0
    for shape in shapes:
        rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (0, 0)
        compressed = (rows + cols) * powersgd_rank
        elements += (
            compressed if len(shape) > 1 and compressed * min_compression_rate < rows * cols else math.prod(shape)
        )
    return elements * GRADIENT_BYTES


def ring_bytes(payload: float, processes: int) -> float:
    """Bytes each process sends (and receives) in a ring all-reduce of `payload` bytes."""
    return 2 * (processes - 1) / processes * payload


@dataclass
class Prediction:
    processes: int
    bandwidth_gbps: float
    latency_s: float
    compute_seconds: float
    comm_seconds: float
    efficiency: float  # no overlap
    communication_share: float
    accumulation_for_target: int  # the smallest k keeping communication_share <= target
    target: float


def predict(compute_seconds, payload, processes, bandwidth_gbps, latency_s=0.0, bucket_bytes=25 * 2**20, target=0.2):
    """The model of the module docstring for one N and one link."""
    if processes < 1 or bandwidth_gbps <= 0 or compute_seconds <= 0 or not 0 < target < 1:
        raise ValueError("processes >= 1, bandwidth > 0, compute time > 0 and 0 < target < 1 are needed")
    buckets = max(1, math.ceil(payload / bucket_bytes))
    comm = ring_bytes(payload, processes) / (bandwidth_gbps * 1e9) + 2 * (processes - 1) * buckets * latency_s
    # t_comm / (k t_compute + t_comm) <= target  <=>  k >= t_comm (1 - target) / (target t_compute)
    accumulation = max(1, math.ceil(comm * (1 - target) / (target * compute_seconds) - 1e-9))
    efficiency = compute_seconds / (compute_seconds + comm)
    share = comm / (compute_seconds + comm)
    return Prediction(
        processes, bandwidth_gbps, latency_s, compute_seconds, comm, efficiency, share, accumulation, target
    )


def parse_link(text: str) -> tuple[str, float, float]:
    """(name, GB/s, latency s) from a LINKS name or a number of GB/s (latency 0)."""
    if text in LINKS:
        return text, LINKS[text][0], LINKS[text][1]
    try:
        bandwidth = float(text)
    except ValueError:
        raise ValueError(f"a bandwidth is a number of GB/s or one of {', '.join(LINKS)}; got {text!r}") from None
    if not bandwidth > 0:
        raise ValueError(f"a bandwidth must be > 0 GB/s, got {text!r}")
    return f"{bandwidth:g} GB/s", bandwidth, 0.0


def prediction_table(compute_seconds, payload, processes, links, bucket_bytes=25 * 2**20, target=0.2):
    """Rows for every (link, N), and the same as a printable table."""
    header = ["link", "GB/s", "N", "comm ms", "efficiency", "comm share", f"accumulation for <= {target:.0%}"]
    rows, cells = [], [header]
    for link in links:
        name, bandwidth, latency = parse_link(link)
        for n in processes:
            p = predict(compute_seconds, payload, n, bandwidth, latency, bucket_bytes, target)
            rows.append({"link": name, **asdict(p)})
            figures = (bandwidth, n, p.comm_seconds * 1e3, p.efficiency, p.communication_share)
            cells.append(
                [name, *map(format, figures, (".1f", "d", ".2f", ".2f", ".1%")), str(p.accumulation_for_target)]
            )
    title = (
        f"predicted scaling: {compute_seconds * 1e3:.1f} ms compute per optimizer step and process, "
        f"{payload / 1e6:.1f} MB all-reduced per step; no overlap of communication with backward (pessimistic)"
    )
    return rows, "\n".join([title, *columns(cells, "<>>>>><", indent="  ")])


def time_all_reduce(payload_bytes: int, output: str, repeats: int = 3) -> None:
    """Under torchrun: the median seconds of one all-reduce of `payload_bytes` (fp32) over N processes, to `output`."""
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if on_gpu else torch.device("cpu")
    buffer = torch.zeros(max(1, payload_bytes // 4), dtype=torch.float32, device=device)
    dist.all_reduce(buffer)  # warm-up: connections, allocations
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize() if on_gpu else None
        started = time.perf_counter()
        dist.all_reduce(buffer)
        torch.cuda.synchronize() if on_gpu else None
        seconds.append(time.perf_counter() - started)
    if dist.get_rank() == 0:
        Path(output).write_text(json.dumps({"allreduce_seconds": statistics.median(seconds)}))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], what: str) -> None:
    print(f"== {what}: {' '.join(command)}", flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise RunFailed(f"{what} failed (its output is above)")


def measure(n: int, benchmark_args: list[str], folder: Path, payload: int) -> dict:
    """The benchmark on `n` processes (with --baseline of the one-process run) and, for n > 1, the all-reduce of the
    gradient timed alone: its bus bandwidth 2 (N-1)/N x bytes / s."""
    output, bin_dir = folder / f"{n}.json", Path(sys.executable).parent
    command = [sys.executable, "-m", "distcifar.benchmark", *benchmark_args, "--output", str(output)]
    if n > 1:
        launch = ROOT / "launch" / ("multi_gpu.yaml" if torch.cuda.is_available() else "cpu_multi.yaml")
        command = [str(bin_dir / "accelerate"), "launch", "--config_file", str(launch), "--num_processes", str(n)]
        command += ["--main_process_port", str(_free_port()), "-m", "distcifar.benchmark", *benchmark_args]
        command += ["--output", str(output), "--baseline", str(folder / "1.json")]
    _run(command, f"the {n}-process benchmark")
    result = json.loads(output.read_text())
    if n > 1:
        timing = folder / f"allreduce-{n}.json"
        torchrun = [str(bin_dir / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(_free_port())]
        _run(
            [*torchrun, __file__, "--time_allreduce", str(payload), "--output", str(timing)],
            f"the {n}-process all-reduce",
        )
        result.update(json.loads(timing.read_text()))
    return result


def add_model_figures(result: dict, payload: int, fp32_bytes: int, bucket_bytes: float) -> None:
    """Into one benchmark result: the bytes its processes all-reduce per step (`payload`, after ddp.comm_hook), the
    link's bus bandwidth from the fp32 all-reduce timed alone, and the model's communication share for that step
    time and link (None for one process: no DDP)."""
    n = result["num_processes"]
    if result.get("comm_hook_active") is False:  # the hook was still in its warm-up: the whole gradient went
        payload = fp32_bytes
    result.update(gradient_megabytes=payload / 1e6, allreduce_megabytes_per_process=ring_bytes(payload, n) / 1e6)
    result.setdefault("allreduce_seconds", None)
    result["link_gbps"], result["predicted_communication_share"] = None, None
    if n > 1:
        result["link_gbps"] = ring_bytes(fp32_bytes, n) / result["allreduce_seconds"] / 1e9
        share = predict(result["compute_seconds_per_step"], payload, n, result["link_gbps"], bucket_bytes=bucket_bytes)
        result["predicted_communication_share"] = share.communication_share


def sweep(args, cfg, benchmark_args: list[str]) -> dict:
    """--processes: the benchmark once per N (one process first), the model's figures for each, one table."""
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    uneven = [n for n in args.processes if batch % (n * accum)]
    if uneven:  # refused before the first run rather than after it
        multiple = math.lcm(*args.processes) * accum
        raise UsageError(
            f"--processes: train.batch_size {batch} does not split over {uneven} processes x {accum} "
            f"accumulation; use a multiple of {multiple} (e.g. --train.batch_size {multiple * 64})"
        )
    parameters = list(DistCifarNet(cfg.model).parameters())
    payload, fp32_bytes = (
        gradient_bytes(parameters, cfg.ddp.comm_hook, cfg.ddp.powersgd_rank),
        gradient_bytes(parameters),
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="distcifar-sweep-") as folder:
        for n in sorted(set(args.processes) | {1}):
            results[n] = measure(n, benchmark_args, Path(folder), fp32_bytes)
            add_model_figures(results[n], payload, fp32_bytes, cfg.ddp.bucket_cap_mb * 2**20)
    one = results[1]["loop_images_per_second"]
    keys = ("loop_images_per_second", "total_images_per_second", "nosync_images_per_second", "communication_share")
    keys += ("predicted_communication_share", "link_gbps", "load_average", "num_threads")
    table = [
        {"processes": n, **{key: r[key] for key in keys}, "speedup": r["total_images_per_second"] / one}
        | {"scaling_efficiency": r["total_images_per_second"] / one / n}
        for n, r in results.items()
    ]
    print(sweep_report(table), flush=True)
    combined = {"table": table, "runs": {str(n): r for n, r in results.items()}}
    if args.predict:
        largest = results[max(results)]
        combined["prediction"], text = prediction_table(
            largest["compute_seconds_per_step"],
            payload,
            args.predict,
            args.bandwidth,
            cfg.ddp.bucket_cap_mb * 2**20,
            args.target,
        )
        largest["prediction"] = combined["prediction"]
        print(text, flush=True)
    return combined


def sweep_report(table: list[dict]) -> str:
    fmt = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    names = ["N", "threads", "images/s", "total", "speedup", "efficiency", "no-sync", "comm share", "model", "GB/s"]
    keys = ["processes", "num_threads", "loop_images_per_second", "total_images_per_second", "speedup"]
    keys += ["scaling_efficiency", "nosync_images_per_second", "communication_share", "predicted_communication_share"]
    keys += ["link_gbps"]
    specs = ["d", "d", ".1f", ".1f", ".2f", ".2f", ".1f", ".1%", ".1%", ".2f"]
    cells = [[*names, "load"]]
    for row in table:
        load = f"{row['load_average'][0]:.1f}-{row['load_average'][1]:.1f}"
        cells.append([*(fmt(row[key], spec) for key, spec in zip(keys, specs)), load])
    title = "scaling: the same config on 1..N processes of this machine (per process unless total)"
    return "\n".join([title, *columns(cells, ">" * 10 + "<", indent="  ")])


def counts(text: str | None, option: str) -> list[int] | None:
    """ "1,2,3" -> [1, 2, 3]"""
    if text is None:
        return None
    try:
        values = [int(part) for part in str(text).split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"{option} takes process counts >= 1 separated by commas (e.g. 1,2,3), got {text!r}")
    return values


def parse(argv: list[str]):
    """(this script's options, the benchmark's config, the benchmark's own arguments)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", help="comma-separated process counts to measure (1 always comes first)")
    parser.add_argument("--predict", help="comma-separated process counts to forecast with the model")
    parser.add_argument("--bandwidth", default=",".join(LINKS), help=f"links: GB/s or names ({', '.join(LINKS)})")
    parser.add_argument("--target", type=float, default=0.2, help="the communication share to stay under")
    parser.add_argument("--step_seconds", type=float, help="the model's compute time per step instead of measuring")
    parser.add_argument("--output", help="also write the figures to this JSON file")
    parser.add_argument("--time_allreduce", type=int, help=argparse.SUPPRESS)  # the all-reduce timing, under torchrun
    args, benchmark_args = parser.parse_known_args(argv)
    args.processes, args.predict = counts(args.processes, "--processes"), counts(args.predict, "--predict")
    args.bandwidth = [link.strip() for link in str(args.bandwidth).split(",")]
    try:
        for link in args.bandwidth:
            parse_link(link)
    except ValueError as err:
        raise UsageError(f"--bandwidth: {err}") from None
    if not 0 < args.target < 1:
        raise UsageError(f"--target must be between 0 and 1, got {args.target}")
    if args.step_seconds is not None and (args.step_seconds <= 0 or not args.predict):
        raise UsageError("--step_seconds needs a value > 0 and --predict N,...")
    if args.processes and "--baseline" in benchmark_args:
        raise UsageError("--processes measures its own baseline; leave out --baseline")
    if not args.processes and args.step_seconds is None and args.time_allreduce is None:
        raise UsageError("give --processes N,... to measure, or --step_seconds S --predict N,... to forecast")
    _, cfg = benchmark.parse(benchmark_args)  # the config the benchmark will run, --quick's included
    return args, cfg, benchmark_args


@entry_point
def main(argv: list[str] | None = None) -> dict | None:
    args, cfg, benchmark_args = parse(sys.argv[1:] if argv is None else argv)
    if args.time_allreduce is not None:
        return time_all_reduce(args.time_allreduce, args.output)
    if args.processes:
        result = sweep(args, cfg, benchmark_args)
    else:  # the model alone, for the configured network
        parameters = list(DistCifarNet(cfg.model).parameters())
        payload = gradient_bytes(parameters, cfg.ddp.comm_hook, cfg.ddp.powersgd_rank)
        rows, table = prediction_table(
            args.step_seconds, payload, args.predict, args.bandwidth, cfg.ddp.bucket_cap_mb * 2**20, args.target
        )
        print(table, flush=True)
        result = {
            "compute_seconds_per_step": args.step_seconds,
            "gradient_megabytes": payload / 1e6,
            "prediction": rows,
        }
        result["model_parameters"] = sum(p.numel() for p in parameters)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
