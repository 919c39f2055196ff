"""The benchmark over several process counts, and the scaling model's prediction without measuring.

    python -m distcifar.benchmark --processes 1,2,3 ...            (launches the benchmark once per N: one table)
    python -m distcifar.benchmark --step_seconds 0.001 --predict 2,8,64     (the model alone, no measuring)

benchmark.main hands both modes here. --processes runs the benchmark once per N in a row (N = 1 plainly,
N > 1 through `accelerate launch --config_file launch/cpu_multi.yaml` without a GPU, launch/multi_gpu.yaml
with one, each with --baseline of the N = 1 run) and prints one table of speedup and scaling efficiency.
--step_seconds prints scaling.py's prediction for the configured network from a given compute time per step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from distcifar import scaling
from distcifar.errors import RunFailed, UsageError
from distcifar.model import DistCifarNet

ROOT = Path(__file__).resolve().parent.parent


def predict_only(args, cfg) -> dict:
    """--step_seconds: the model's table from a given compute time, for the configured network; nothing measured."""
    parameters = list(DistCifarNet(cfg.model).parameters())
    payload = scaling.gradient_bytes(parameters, cfg.ddp.comm_hook, cfg.ddp.powersgd_rank)
    rows, table = scaling.prediction_table(
        args.step_seconds, payload, args.predict, args.bandwidth, cfg.ddp.bucket_cap_mb * 2**20, args.target
    )
    print(table, flush=True)
    result = {
        "compute_seconds_per_step": args.step_seconds,
        "gradient_megabytes": payload / 1e6,
        "model_parameters": sum(p.numel() for p in parameters),
        "ddp": dataclasses.asdict(cfg.ddp),
        "prediction": rows,
    }
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return result


def without_options(argv: list[str], *names: str) -> list[str]:
    """argv less `--name VALUE` and `--name=VALUE` for each name."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not any(arg.startswith(f"{name}=") for name in names):
            kept.append(arg)
    return kept


def sweep(args, cfg, argv: list[str]) -> dict:
    """--processes 1,2,3: this benchmark once per count, one after the other, each N > 1 with --baseline of
    the one-process run (which comes first whether listed or not); one table, and with --output one JSON."""
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    uneven = [n for n in args.processes if batch % (n * accum)]
    if uneven:  # refuse before the first run rather than after it
        multiple = math.lcm(*args.processes) * accum
        raise UsageError(
            f"--processes: train.batch_size {batch} does not split over {uneven} processes x {accum} "
            f"accumulation; use a multiple of {multiple} (e.g. --train.batch_size {multiple * 64})"
        )
    child_args = without_options(argv, "--processes", "--output", "--baseline")
    results = {}
    with tempfile.TemporaryDirectory(prefix="distcifar-sweep-") as folder:
        for n in sorted(set(args.processes) | {1}):
            output = Path(folder) / f"{n}.json"
            command = _benchmark_command(n, [*child_args, "--output", str(output)], Path(folder) / "1.json")
            print(f"== {n} process(es): {' '.join(command)}", flush=True)
            if subprocess.run(command, cwd=ROOT).returncode != 0 or not output.exists():
                raise RunFailed(f"the {n}-process benchmark failed (its output is above)")
            results[n] = json.loads(output.read_text())
    one = results[1]["loop_images_per_second"]
    table = [
        {
            "processes": n,
            "threads_per_process": r["num_threads"],
            "images_per_second_per_process": r["loop_images_per_second"],
            "total_images_per_second": r["total_images_per_second"],
            "speedup": r["total_images_per_second"] / one,
            "scaling_efficiency": r["total_images_per_second"] / one / n,
            "nosync_images_per_second": r["nosync_images_per_second"],
            "communication_share": r["communication_share"],
            "predicted_communication_share": r["predicted_communication_share"],
            "link_gbps": r["link_gbps"],
            "load_average": r["load_average"],
        }
        for n, r in results.items()
    ]
    print(sweep_report(table), flush=True)
    combined = {"table": table, "runs": {str(n): r for n, r in results.items()}}
    if args.output:
        Path(args.output).write_text(json.dumps(combined, indent=2) + "\n")
    return combined


def _benchmark_command(processes: int, args: list[str], baseline: Path) -> list[str]:
    """The benchmark on `processes` processes: plainly for one, else through `accelerate launch` (launch/cpu_multi.yaml
    without a GPU, launch/multi_gpu.yaml with one) on a free port, with --baseline of the one-process run."""
    if processes == 1:
        return [sys.executable, "-m", "distcifar.benchmark", *args]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    accelerate_bin = Path(sys.executable).parent / "accelerate"
    launch_file = ROOT / "launch" / ("multi_gpu.yaml" if torch.cuda.is_available() else "cpu_multi.yaml")
    return [
        str(accelerate_bin) if accelerate_bin.exists() else "accelerate",
        "launch",
        "--config_file",
        str(launch_file),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(port),
        "-m",
        "distcifar.benchmark",
        *args,
        "--baseline",
        str(baseline),
    ]


def sweep_report(table: list[dict]) -> str:
    fmt = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
    lines = [
        "scaling: the same config on 1..N processes of this machine (per process unless total)",
        f"  {'N':>3} {'threads':>7} {'images/s':>9} {'total':>8} {'speedup':>8} {'efficiency':>10} "
        f"{'no-sync':>8} {'comm share':>10} {'model':>6} {'GB/s':>6}  load",
    ]
    for row in table:
        lines.append(
            f"  {row['processes']:>3} {row['threads_per_process']:>7} {row['images_per_second_per_process']:>9.1f} "
            f"{row['total_images_per_second']:>8.1f} {row['speedup']:>8.2f} {row['scaling_efficiency']:>10.2f} "
            f"{fmt(row['nosync_images_per_second'], '8.1f'):>8} {fmt(row['communication_share'], '10.1%'):>10} "
            f"{fmt(row['predicted_communication_share'], '6.1%'):>6} {fmt(row['link_gbps'], '6.2f'):>6}  "
            f"{row['load_average'][0]:.1f}-{row['load_average'][1]:.1f}"
        )
    return "\n".join(lines)
