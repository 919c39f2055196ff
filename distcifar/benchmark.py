"""How close does train.py's loop come to a bare PyTorch loop on this machine, and where does the time go?

    python -m distcifar.benchmark [--config FILE] [--section.field VALUE ...] [--quick] [--output bench.json]
    accelerate launch --config_file launch/cpu_multi.yaml --num_processes 2 -m distcifar.benchmark --baseline one.json

Per process: (1) bare PyTorch on one resident batch, (2) train.py's own steps (engine.optimizer_steps, rows logged),
(3) the data pipeline alone, (4) checkpoint save and load, (5) launch to first step, (6) utilisation. (1) and (2)
take turns so that other jobs' load hits both alike; each figure is the median of --repeats runs. Under N > 1
processes also (2b) the same steps inside no_sync(): the communication share, and with --baseline the scaling
efficiency. What each figure means: docs/performance.md; the process sweep and bandwidth model: scripts/scaling.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from distcifar import tracking
from distcifar.accelerator import build_accelerator
from distcifar.checkpoint import Checkpointer
from distcifar.cli import columns
from distcifar.config import parse_config
from distcifar.data import Split, load_splits
from distcifar.engine import Progress, build_training, optimizer_steps
from distcifar.errors import UsageError, entry_point
from distcifar.hardware import hardware, wait_for_device
from distcifar.model import DistCifarNet, memory_format, parameter_count, uncompiled
from distcifar.optim import build_optimizer
from distcifar.ranks import decided_by_main_process, end_run, fail_together, print_once, rank_weight_spread
from distcifar.utilization import MATMUL_FLOPS, MATMUL_SIZE, matmuls, peak_memory_gb

QUICK = ["--model.block_channels", "[8,8,16,16,32,32]", "--model.classifier_hidden", "[32]"]
QUICK += ["--train.batch_size", "32", "--data.train_limit", "1024", "--warmup=1", "--steps=2", "--repeats=1"]
QUICK += ["--data_steps=4"]
GPU_COUNTS = ["--warmup=20", "--steps=100"]  # 5 steps on a GPU take ~0.1 s, the first ones with cuDNN's search


def timed(steps, count: int, device: torch.device) -> float:
    """Wall seconds of `count` more items of the generator `steps`."""
    wait_for_device(device)
    started = time.perf_counter()
    for _ in range(count):
        next(steps)
    wait_for_device(device)
    return time.perf_counter() - started


def bare_loop(cfg, accelerator, micro_batch: int):
    """(1) Plain PyTorch: grad_accum_steps forward/backward passes on one resident batch, then an optimizer step."""
    device, layout = accelerator.device, memory_format(cfg.train.channels_last)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    set_seed(cfg.train.seed)
    model = DistCifarNet(cfg.model).to(device, memory_format=layout).train()
    optimizer = build_optimizer(model, cfg.optim)
    model = torch.compile(model) if cfg.train.compile else model
    images = torch.randn(micro_batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, cfg.model.num_classes, (micro_batch,), device=device)
    scaler, accum = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), cfg.train.grad_accum_steps
    while True:
        for _ in range(accum):
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                loss = F.cross_entropy(model(images), labels, label_smoothing=cfg.optim.label_smoothing)
            scaler.scale(loss / accum).backward()
        if cfg.optim.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        yield


def logged(steps, tracker):
    """(2) train.py's steps with their rows logged, as train.py's loop logs them."""
    for report in steps:
        for row in report.rows:
            tracker.log(row, step=report.step)
        yield report


def without_gradient_sync(ddp_model, steps):
    """(2b) The items of `steps`, each taken inside DDP's no_sync(): the same work without the all-reduce."""
    while True:
        with ddp_model.no_sync():
            item = next(steps)
        yield item


def data_loop(batches):
    """(3) Every micro-batch of every step, augmented, and nothing else."""
    step = 0
    while True:
        yield from batches.at_step(step)
        step += 1


def add_arguments(parser) -> None:
    parser.add_argument("--warmup", type=int, default=2, help="Untimed optimizer steps per loop (20 on a GPU).")
    parser.add_argument("--steps", type=int, default=5, help="Optimizer steps per timed run (100 on a GPU).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each loop; the median is reported.")
    parser.add_argument("--data_steps", type=int, default=50, help="Micro-batches per timed run of the data pipeline.")
    parser.add_argument("--quick", action="store_true", help="Tiny model and counts: proves that it runs (CI).")
    parser.add_argument("--output", type=str, default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--baseline", type=str, default=None, help="JSON of a one-process run of the same config.")


def parse(argv: list[str]):
    defaults = []
    if not torch.cuda.is_available() and not any(a == "--config" or a.startswith("--config=") for a in argv):
        defaults += ["--train.batch_size", "128"]
    defaults += QUICK if "--quick" in argv else GPU_COUNTS if torch.cuda.is_available() else []
    cfg, args = parse_config(
        defaults + argv, prog="distcifar-benchmark", description=__doc__, add_arguments=add_arguments
    )
    if min(args.steps, args.repeats, args.data_steps) < 1 or args.warmup < 0:
        raise UsageError("--steps, --repeats and --data_steps must be >= 1, --warmup >= 0")
    cfg.tracking.report_to, cfg.tracking.plots, cfg.resume = "none", False, "never"
    return args, cfg


def set_up(cfg, accelerator, launched: float) -> tuple[dict, dict]:
    """train.py's construction of a run and its first optimizer step: the loops, and the startup figures."""
    scratch = decided_by_main_process(accelerator, lambda: tempfile.mkdtemp(prefix="distcifar-bench-"))
    cfg.output_dir = scratch  # the main process's throwaway folder, for every rank
    set_seed(cfg.train.seed)
    if cfg.data.path:
        with accelerator.main_process_first():
            train_split, eval_split, _ = load_splits(cfg.data, cfg.model.num_classes)
    else:  # 1000 distinct random images, tiled: the content does not change the timing
        generator = torch.Generator().manual_seed(0)
        size, distinct = cfg.data.train_limit or 50_000, torch.randint(0, 256, (1000, 3, 32, 32), generator=generator)
        images = distinct.to(torch.uint8).repeat(-(-size // 1000), 1, 1, 1)[:size].contiguous()
        train_split = Split(images, torch.randint(0, cfg.model.num_classes, (size,), generator=generator))
        eval_split = train_split.head(cfg.train.eval_batch_size)
    training = build_training(cfg, accelerator, train_split, eval_split)
    tracker = tracking.Tracker(accelerator, cfg, Path(cfg.output_dir), None, hardware(accelerator))
    loop = logged(optimizer_steps(accelerator, training, cfg.optim, Progress(), until=sys.maxsize), tracker)
    startup_seconds = time.time() - launched
    first_step_seconds = timed(loop, 1, accelerator.device)
    data = cfg.data.path or f"synthetic ({len(train_split)} images)"
    parts = dict(training=training, tracker=tracker, loop=loop, scratch=scratch, data=data)
    return parts, {
        "startup_seconds": startup_seconds,
        "first_step_seconds": first_step_seconds,
        "launch_to_first_step_seconds": time.time() - launched,
    }


def time_loops(args, cfg, accelerator, parts) -> tuple[dict[str, list[float]], bool | None]:
    """(1), (2), (2b) and on a CPU the matmul peak, warmed up, then timed in turns: images/s (the peak: TFLOP/s) of
    each run. Also whether no-sync skipped the all-reduce (None: one process)."""
    training, device = parts["training"], accelerator.device
    loops = {"bare": bare_loop(cfg, accelerator, training.batches.micro_batch), "loop": parts["loop"]}
    for steps in loops.values():
        timed(steps, args.warmup, device)
    skips_all_reduce = None
    if accelerator.num_processes > 1:
        before = rank_weight_spread(accelerator, training.model)
        loops["nosync"] = without_gradient_sync(uncompiled(training.model), parts["loop"])
        timed(loops["nosync"], max(1, args.warmup), device)
        skips_all_reduce = before == 0.0 and rank_weight_spread(accelerator, training.model) > 0.0
        if not skips_all_reduce:
            print_once("warning: the no-sync step left the ranks identical: its figure is not a step without sync")
    if device.type == "cpu":  # the CPU's peak, under the same load as the steps (a GPU's is published)
        loops["peak"] = matmuls(training.compute.precision)
        timed(loops["peak"], 1, device)  # its first matmul makes the matrices: not part of any timed run
    images_per_step = training.batches.micro_batch * cfg.train.grad_accum_steps
    runs = {name: [] for name in loops}
    chunk = 1 if device.type == "cpu" else args.steps
    for repeat in range(args.repeats):
        spent = dict.fromkeys(loops, 0.0)
        for _ in range(args.steps // chunk):
            for name, steps in loops.items():
                spent[name] += timed(steps, chunk, device)
        for name, wall in spent.items():
            runs[name].append(args.steps * (MATMUL_FLOPS / 1e12 if name == "peak" else images_per_step) / wall)
        print_once(f"  run {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.4g}" for k, v in runs.items()))
    return runs, skips_all_reduce


def time_data_and_checkpoints(args, cfg, accelerator, parts, runs: dict) -> float:
    """(3) and (4) into `runs`; the checkpoint's megabytes."""
    device, training = accelerator.device, parts["training"]
    data = data_loop(training.batches)
    timed(data, 2, device)
    runs["data"] = [args.data_steps / timed(data, args.data_steps, device) for _ in range(args.repeats)]
    checkpointer = Checkpointer.for_run(accelerator, cfg, training)
    runs["checkpoint_save"], runs["checkpoint_load"] = [], []
    for repeat in range(args.repeats):
        wait_for_device(device)
        started = time.perf_counter()
        path = checkpointer.save(repeat, {"step": repeat})
        runs["checkpoint_save"].append(time.perf_counter() - started)
        started = time.perf_counter()
        checkpointer.load(path)
        wait_for_device(device)
        runs["checkpoint_load"].append(time.perf_counter() - started)
    return sum(f.stat().st_size for f in path.iterdir()) / 1e6


def figures(cfg, accelerator, parts, runs: dict, skips_all_reduce, baseline: dict | None) -> dict:
    """Medians, the ratios of figures timed in the same run (so under the same load), run by run, and what N
    processes buy; TFLOP/s by the run's Compute, as the loop's log rows and summary.json have them."""
    compute, world = parts["training"].compute, accelerator.num_processes
    runs["loop_vs_bare"] = [loop / bare for loop, bare in zip(runs["loop"], runs["bare"])]
    for name in ("bare", "loop"):
        if "peak" in runs:  # each run's share of the matmul peak timed in turns with it
            runs[f"{name}_mfu"] = [compute.tflops(ips) / peak for ips, peak in zip(runs[name], runs["peak"])]
    if world > 1:
        runs["communication_share"] = [1 - loop / nosync for loop, nosync in zip(runs["loop"], runs["nosync"])]
    median = {name: statistics.median(values) for name, values in runs.items()}
    micro_batch = parts["training"].batches.micro_batch
    peak = median.get("peak") or (compute.peak_tflops / world if compute.peak_tflops else None)
    per_rank = accelerator.gather(torch.tensor([median["loop"]], dtype=torch.float64, device=accelerator.device))
    total, images_per_step = sum(per_rank.tolist()), micro_batch * cfg.train.grad_accum_steps
    speedup = total / baseline["loop_images_per_second"] if baseline else None
    result = {"bare_images_per_second": median["bare"], "loop_images_per_second": median["loop"]}
    for name in ("bare", "loop"):
        result[f"{name}_tflops"] = compute.tflops(median[name])
        result[f"{name}_mfu"] = median.get(f"{name}_mfu", result[f"{name}_tflops"] / peak if peak else None)
    return result | {
        "data_images_per_second": median["data"] * micro_batch,
        "data_batches_per_second": median["data"],
        "loop_vs_bare_ratio": median["loop"] / median["bare"],
        "data_vs_step_ratio": median["data"] * micro_batch / median["loop"],
        "checkpoint_save_seconds": median["checkpoint_save"],
        "checkpoint_load_seconds": median["checkpoint_load"],
        "train_flops_per_image": compute.flops_per_image,
        "compute_precision": compute.precision,
        "peak_tflops": peak,
        "peak_source": (
            f"{compute.precision} {MATMUL_SIZE}x{MATMUL_SIZE} matmul, timed in turns with the steps"
            if "peak" in median
            else compute.peak_source
        ),
        "peak_memory_gb": peak_memory_gb(accelerator.device),
        "total_images_per_second": total,
        "rank_images_per_second": per_rank.tolist(),
        "nosync_images_per_second": median.get("nosync"),
        "communication_share": median.get("communication_share"),
        "nosync_skips_all_reduce": skips_all_reduce,
        "comm_hook_active": comm_hook_active(uncompiled(parts["training"].model)) if world > 1 else None,
        "compute_seconds_per_step": images_per_step / (median["nosync"] if world > 1 else median["loop"]),
        "baseline_images_per_second": baseline["loop_images_per_second"] if baseline else None,
        "speedup": speedup,
        "scaling_efficiency": speedup / world if baseline else None,
    }


def comm_hook_active(ddp_model) -> bool | None:
    """Whether ddp.comm_hook compressed the steps just timed (None: no hook). PowerSGD all-reduces the whole gradient
    until ddp.powersgd_start_step, so a short run may time only its warm-up (scripts/scaling.py counts the bytes)."""
    hooks = getattr(ddp_model, "_comm_hooks", [])
    if not hooks:
        return None
    state = hooks[0][1]
    return state.iter >= state.start_powerSGD_iter if hasattr(state, "start_powerSGD_iter") else True


def read_baseline(accelerator, path: str, cfg, parameters: int) -> dict:
    """--baseline's JSON, read by the main process, refused unless it measured the same network, batch and
    precision in one process."""

    def read() -> dict:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            return {"error": f"--baseline {path}: {err}"}

    baseline, train = decided_by_main_process(accelerator, read), cfg.train
    want = {"num_processes": 1, "batch_size": train.batch_size, "grad_accum_steps": train.grad_accum_steps}
    want |= {"model_parameters": parameters, "mixed_precision": accelerator.mixed_precision}
    want |= {"channels_last": train.channels_last, "compile": train.compile}
    wrong = baseline.get("error") or ", ".join(
        f"{key} {baseline.get(key)!r} (here {value!r})" for key, value in want.items() if baseline.get(key) != value
    )
    message = f"--baseline must be a one-process run of the same config: {wrong}" if wrong else None
    fail_together(accelerator, UsageError, message, same_on_every_rank=True)  # every rank read the same record
    return baseline


def report(r: dict) -> str:
    """The printed table: the setting, then one row per figure with each run's value."""

    def spread(name: str, spec: str) -> str:
        return " ".join(format(value, spec) for value in r["runs"].get(name, []))

    rows = [
        ("1. bare PyTorch step", f"{r['bare_images_per_second']:.1f} images/s", spread("bare", ".1f")),
        ("2. train.py step", f"{r['loop_images_per_second']:.1f} images/s", spread("loop", ".1f")),
        ("3. data pipeline", f"{r['data_images_per_second']:.0f} images/s", f"{r['data_batches_per_second']:.1f}/s"),
        ("4. checkpoint save", f"{r['checkpoint_save_seconds']:.3f} s", f"({r['checkpoint_megabytes']:.0f} MB)"),
        ("   checkpoint load", f"{r['checkpoint_load_seconds']:.3f} s", spread("checkpoint_load", ".3f")),
        (
            "5. launch -> first step",
            f"{r['launch_to_first_step_seconds']:.1f} s",
            f"{r['imports_seconds']:.1f} s imports",
        ),
        ("loop / bare", f"{r['loop_vs_bare_ratio']:.3f}", f"run by run {spread('loop_vs_bare', '.3f')}"),
        ("data / loop", f"{r['data_vs_step_ratio']:.1f}", ""),
        ("6. training FLOPs per image", f"{r['train_flops_per_image'] / 1e9:.3g} GFLOP", "FlopCounterMode"),
    ]
    if r["peak_tflops"]:
        rows.append(("   peak", f"{r['peak_tflops']:.3g} TFLOP/s", r["peak_source"]))
        rows += [
            (f"   utilisation of {n}.", f"{r[k + '_mfu']:.1%}", f"{r[k + '_tflops']:.3g} TFLOP/s")
            for n, k in ((1, "bare"), (2, "loop"))
        ]
    if r["num_processes"] > 1:
        checked = "" if r["nosync_skips_all_reduce"] else " (NOT checked: see warning)"
        efficiency = f"scaling efficiency {r['scaling_efficiency']:.2f}" if r["speedup"] else "(--baseline: efficiency)"
        rows += [
            ("2b. no grad sync", f"{r['nosync_images_per_second']:.1f} images/s", spread("nosync", ".1f") + checked),
            ("communication share", f"{r['communication_share']:.1%}", spread("communication_share", ".1%")),
            (f"total over {r['num_processes']}", f"{r['total_images_per_second']:.1f} images/s", efficiency),
        ]
    header = (
        f"distcifar benchmark: {r['device']} ({r['device_name']}), {r['num_threads']} threads, {r['num_processes']} "
        f"process(es), {r['mixed_precision']}, batch {r['batch_size']} ({r['micro_batch_size']} per device), "
        f"{r['model_parameters'] / 1e6:.2f}M parameters, {r['data']}, {r['repetitions']} x {r['steps']} steps"
    )
    return "\n".join([header, *columns([list(row) for row in rows], "<><", indent="  ")])


@entry_point
def main(argv: list[str] | None = None) -> dict:
    launched = psutil.Process().create_time()  # wall clock at process start (imports included)
    imports_seconds = time.time() - launched
    args, cfg = parse(sys.argv[1:] if argv is None else argv)
    load_average = [os.getloadavg()[0]]
    accelerator = build_accelerator(cfg)
    parts, startup = set_up(cfg, accelerator, launched)  # (2) first: its first step is (5)
    training = parts["training"]
    parameters = parameter_count(accelerator.unwrap_model(training.model))
    baseline = read_baseline(accelerator, args.baseline, cfg, parameters) if args.baseline else None
    runs, skips_all_reduce = time_loops(args, cfg, accelerator, parts)
    checkpoint_megabytes = time_data_and_checkpoints(args, cfg, accelerator, parts, runs)
    parts["tracker"].finish()
    accelerator.wait_for_everyone()
    load_average.append(os.getloadavg()[0])
    result = {
        **figures(cfg, accelerator, parts, runs, skips_all_reduce, baseline),
        "checkpoint_megabytes": checkpoint_megabytes,
        "imports_seconds": imports_seconds,
        **startup,
        **hardware(accelerator),
        "num_threads": torch.get_num_threads(),
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
        "batch_size": cfg.train.batch_size,
        "micro_batch_size": training.batches.micro_batch,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "model_parameters": parameters,
        "ddp": dataclasses.asdict(cfg.ddp),
        "data": parts["data"],
        "warmup": args.warmup,
        "steps": args.steps,
        "repetitions": args.repeats,
        "quick": args.quick,
        "load_average": load_average,
        "torch_version": torch.__version__,
        "runs": runs,
    }
    if accelerator.is_main_process:
        print(report(result), flush=True)
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        shutil.rmtree(parts["scratch"], ignore_errors=True)
    end_run(accelerator)  # every rank together; skips the teardown that can abort with several processes
    return result


if __name__ == "__main__":
    main()
