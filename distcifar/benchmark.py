"""How close does the training loop come to a bare PyTorch loop on this machine?

    python -m distcifar.benchmark [--config FILE] [--section.field VALUE ...] [--warmup 2] [--steps 5]
                                  [--repeats 3] [--quick] [--output bench.json]
    accelerate launch -m distcifar.benchmark ...      (or: accelerate launch distcifar/benchmark.py ...)

One process, the current device and precision, the config taken as train.py takes it (default:
the default config, with batch 128 on a CPU unless --config or --train.batch_size say otherwise).
It measures

  1. bare:  the same network, micro-batch, precision and memory layout in a plain PyTorch loop
            (forward, backward, optimizer step) on one synthetic batch already on the device;
  2. loop:  train.py's steps: the same engine.build and the same engine.optimizer_steps generator
            that train.py drives (augmented batches of a real-size uint8 training set on the device,
            synthetic unless --data.path is set; accumulation, scheduler, logging every
            train.log_every steps to a real Tracker, the stop/timer agreement). No progress bar, no
            evaluation, no checkpoints;
  3. data:  TrainBatches.epoch alone, every micro-batch augmented and consumed, no model;
  4. checkpoint save and load with Checkpointer (to a temporary folder);
  5. startup: seconds from the start of this process to the first optimizer step, and to its end.

(1) and (2) take turns (step by step on a CPU, run by run on a GPU) so that the load of other jobs
hits both alike; each figure is the median over --repeats timed runs of --steps optimizer steps,
after --warmup steps, per process. On a CPU it also gives CPU seconds per step, which other jobs
disturb less. With --data.path, "dataset load" is load_splits (importing `datasets` included).
With --output FILE the figures also go to a JSON file. --quick shrinks the model, batch and step
counts: it only proves that everything runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch distcifar/benchmark.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import accelerate
import psutil
import torch
import torch.nn.functional as F
from accelerate.utils import broadcast_object_list, set_seed

from distcifar import tracking
from distcifar.checkpoint import Checkpointer
from distcifar.config import parse_config
from distcifar.data import Split, TrainBatches, load_splits
from distcifar.engine import RunState, build, optimizer_steps
from distcifar.model import DistCifarNet
from distcifar.optim import build_optimizer
from distcifar.cli import UsageError, entry_point
from distcifar.runtime import build_accelerator, hardware

# Tiny settings for --quick (CI): the network, batch and data shrink; explicit overrides still win.
QUICK_OVERRIDES = ["--model.block_channels", "[8,8,16,16,32,32]", "--model.classifier_hidden", "[32]",
                   "--train.batch_size", "32", "--data.train_limit", "1024"]
QUICK_COUNTS = dict(warmup=1, steps=2, repeats=1, data_steps=4)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work before reading a clock (CPU work is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(steps, count: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process's threads) for `count` more items of the generator `steps`.

    On a CPU shared with other jobs the wall time swings with their load; the CPU time much less."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        next(steps)
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def synthetic_split(size: int, num_classes: int) -> Split:
    """`size` random uint8 images: 1000 distinct ones tiled (content does not change the timing)."""
    generator = torch.Generator().manual_seed(0)
    distinct = torch.randint(0, 256, (min(size, 1000), 3, 32, 32), dtype=torch.uint8, generator=generator)
    images = distinct.repeat(math.ceil(size / len(distinct)), 1, 1, 1)[:size].contiguous()
    return Split(images, torch.randint(0, num_classes, (size,), generator=generator))


# ---------------------------------------------------------------------------------------------
# The three loops, each a generator that yields after one unit of work


def bare_loop(model, optimizer, images, labels, accum: int, dtype, label_smoothing: float, grad_clip: float):
    """Plain PyTorch: `accum` forward/backward passes on one resident batch, then an optimizer step."""
    device = images.device
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model.train()
    while True:
        for _ in range(accum):
            with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
                loss = F.cross_entropy(model(images), labels, label_smoothing=label_smoothing)
            scaler.scale(loss / accum).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        yield


def data_loop(batches: TrainBatches):
    """Every micro-batch of every step, augmented, and nothing else."""
    epoch = 0
    while True:
        for _, micro_batches in batches.epoch(epoch):
            for images, labels in micro_batches:
                yield images, labels
        epoch += 1


# ---------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--warmup", type=int, default=2, help="Untimed optimizer steps before timing (each loop).")
    parser.add_argument("--steps", type=int, default=5, help="Optimizer steps per timed run.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each loop; the median is reported.")
    parser.add_argument("--data_steps", type=int, default=50, help="Micro-batches per timed run of the data pipeline.")
    parser.add_argument("--quick", action="store_true", help="Tiny model and counts: proves that it runs (CI).")
    parser.add_argument("--output", type=str, default=None, help="Also write the figures to this JSON file.")


def parse(argv: list[str]):
    defaults = []
    if not torch.cuda.is_available() and not any(a == "--config" or a.startswith("--config=") for a in argv):
        defaults += ["--train.batch_size", "128"]
    if "--quick" in argv:  # its defaults go first, so that options given explicitly still win
        defaults += QUICK_OVERRIDES
        defaults += [f"--{name}={value}" for name, value in QUICK_COUNTS.items()]
    cfg, args = parse_config(defaults + argv, prog="distcifar-benchmark", description=__doc__,
                             add_arguments=add_arguments)
    if min(args.steps, args.repeats, args.data_steps) < 1 or args.warmup < 0:
        raise UsageError("--steps, --repeats and --data_steps must be >= 1, --warmup >= 0")
    return args, cfg


@entry_point
def main(argv: list[str] | None = None) -> dict:
    launched = psutil.Process().create_time()  # wall clock at process start (imports included)
    imports_seconds = time.time() - launched
    args, cfg = parse(sys.argv[1:] if argv is None else argv)
    cfg.tracking.report_to, cfg.tracking.plots, cfg.resume = "none", False, "never"
    load_average = [os.getloadavg()[0]]

    # 2. the training loop comes first, so that its first step measures the startup -----------
    accelerator = build_accelerator(cfg)
    # A throwaway output folder from the main process for all ranks (every rank loads the checkpoints);
    # TemporaryDirectory deletes it at exit, also after an error.
    scratch = tempfile.TemporaryDirectory(prefix="distcifar-bench-") if accelerator.is_main_process else None
    root = [scratch.name if scratch else None]
    broadcast_object_list(root)
    cfg.output_dir, out = root[0], Path(root[0])
    device, world = accelerator.device, accelerator.num_processes
    set_seed(cfg.train.seed)
    data_started = time.perf_counter()
    if cfg.data.path:
        with accelerator.main_process_first():
            train_split, eval_split, _ = load_splits(cfg.data, cfg.model.num_classes)
    else:
        train_split = synthetic_split(cfg.data.train_limit or 50_000, cfg.model.num_classes)
        eval_split = train_split.head(cfg.train.eval_batch_size)
    data_seconds = time.perf_counter() - data_started
    parts = build(cfg, accelerator, eval_split, train_split)
    batches = parts.batches
    run_hardware = hardware(accelerator)
    tracker = tracking.Tracker(accelerator, cfg, out, None, run_hardware)
    checkpoints = Checkpointer(accelerator, out / "checkpoints", cfg.checkpoint, cfg.to_dict())
    state = RunState(tracker_run_id=tracker.run_id)
    loop = optimizer_steps(accelerator, parts, cfg, state, tracker=tracker, stop=None, checkpoints=checkpoints,
                           until=sys.maxsize)  # train.py's steps, exactly; one item per optimizer step
    startup_seconds = time.time() - launched
    first_step_seconds = timed(loop, 1, device)[0]
    launch_to_first_step = time.time() - launched

    # 1. the bare loop: same network, micro-batch, precision, layout and optimizer ----------
    set_seed(cfg.train.seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    bare_model = DistCifarNet(cfg.model).to(device, memory_format=memory_format)
    bare_optimizer = build_optimizer(bare_model, cfg.optim)
    if cfg.train.compile:
        bare_model = torch.compile(bare_model)
    images = torch.randn(batches.micro_batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, cfg.model.num_classes, (batches.micro_batch,), device=device)
    bare = bare_loop(bare_model, bare_optimizer, images, labels, cfg.train.grad_accum_steps, dtype,
                     cfg.optim.label_smoothing, cfg.optim.grad_clip)

    # Warm up both, then time them in turn ------------------------------------------------------
    timed(bare, args.warmup, device)
    timed(loop, args.warmup, device)
    images_per_step = batches.micro_batch * cfg.train.grad_accum_steps  # per process
    runs = {"bare": [], "loop": [], "bare_cpu": [], "loop_cpu": []}
    # On a CPU take turns step by step: nothing is queued, and a burst of load from other jobs then hits
    # both loops alike. On a GPU take turns run by run, so that each loop keeps its own queue full.
    chunk = 1 if device.type == "cpu" else args.steps
    for repeat in range(args.repeats):
        spent = {"bare": [0.0, 0.0], "loop": [0.0, 0.0]}  # wall, CPU seconds
        for _ in range(args.steps // chunk):
            for name, steps in (("bare", bare), ("loop", loop)):
                wall, cpu = timed(steps, chunk, device)
                spent[name][0] += wall
                spent[name][1] += cpu
        for name, (wall, cpu) in spent.items():
            runs[name].append(args.steps * images_per_step / wall)
            runs[f"{name}_cpu"].append(cpu / args.steps)
        accelerator.print(f"  run {repeat + 1}/{args.repeats}: bare {runs['bare'][-1]:.1f}, "
                          f"loop {runs['loop'][-1]:.1f} images/s", flush=True)
    del bare, bare_model, bare_optimizer

    # 3. the data pipeline alone --------------------------------------------------------------
    data = data_loop(batches)
    timed(data, 2, device)
    runs["data"] = [args.data_steps / timed(data, args.data_steps, device)[0] for _ in range(args.repeats)]

    # 4. checkpoints ----------------------------------------------------------------------
    runs["checkpoint_save"], runs["checkpoint_load"] = [], []
    for repeat in range(args.repeats):
        sync(device)
        started = time.perf_counter()
        path = checkpoints.save(state, model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler)
        runs["checkpoint_save"].append(time.perf_counter() - started)
        started = time.perf_counter()
        checkpoints.load(path, model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler)
        sync(device)
        runs["checkpoint_load"].append(time.perf_counter() - started)
    checkpoint_bytes = sum(f.stat().st_size for f in path.iterdir())
    tracker.finish()
    accelerator.wait_for_everyone()
    load_average.append(os.getloadavg()[0])

    runs["loop_vs_bare"] = [loop / bare for loop, bare in zip(runs["loop"], runs["bare"])]  # paired: same load
    median = {name: statistics.median(values) for name, values in runs.items()}
    result = {
        "bare_images_per_second": median["bare"],
        "loop_images_per_second": median["loop"],
        "data_images_per_second": median["data"] * batches.micro_batch,
        "data_batches_per_second": median["data"],
        "loop_vs_bare_ratio": median["loop"] / median["bare"],
        "data_vs_step_ratio": median["data"] * batches.micro_batch / median["loop"],
        # CPU seconds per optimizer step: steadier than images/s on a shared CPU, meaningless on a GPU.
        "bare_cpu_seconds_per_step": median["bare_cpu"],
        "loop_cpu_seconds_per_step": median["loop_cpu"],
        "loop_vs_bare_cpu_ratio": median["bare_cpu"] / median["loop_cpu"] if device.type == "cpu" else None,
        "checkpoint_save_seconds": median["checkpoint_save"],
        "checkpoint_load_seconds": median["checkpoint_load"],
        "checkpoint_megabytes": checkpoint_bytes / 1e6,
        "imports_seconds": imports_seconds,
        "startup_seconds": startup_seconds,
        "first_step_seconds": first_step_seconds,
        "launch_to_first_step_seconds": launch_to_first_step,
        "dataset_load_seconds": data_seconds if cfg.data.path else None,
        "device": str(device),
        "device_name": run_hardware["device_name"],
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "num_processes": world,
        "mixed_precision": accelerator.mixed_precision,
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
        "batch_size": cfg.train.batch_size,
        "micro_batch_size": batches.micro_batch,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "log_every": cfg.train.log_every,
        "model_parameters": sum(p.numel() for p in accelerator.unwrap_model(parts.model).parameters()),
        "data": cfg.data.path or f"synthetic ({len(train_split)} images)",
        "warmup": args.warmup,
        "steps": args.steps,
        "repetitions": args.repeats,
        "data_steps": args.data_steps,
        "quick": args.quick,
        "load_average": load_average,
        "torch_version": torch.__version__,
        "accelerate_version": accelerate.__version__,
        "runs": runs,
    }
    if accelerator.is_main_process:
        print(report(result), flush=True)
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        scratch.cleanup()
    accelerator.end_training()
    return result


def report(r: dict) -> str:
    runs = r["runs"]
    spread = lambda values, fmt: " ".join(format(v, fmt) for v in values)  # noqa: E731
    rows = [
        ("1. bare PyTorch step", f"{r['bare_images_per_second']:.1f} images/s", spread(runs["bare"], ".1f")),
        ("2. train.py step", f"{r['loop_images_per_second']:.1f} images/s", spread(runs["loop"], ".1f")),
        ("3. data pipeline", f"{r['data_images_per_second']:.0f} images/s", f"{r['data_batches_per_second']:.1f} batches/s"),
        ("4. checkpoint save", f"{r['checkpoint_save_seconds']:.3f} s",
         f"{spread(runs['checkpoint_save'], '.3f')} ({r['checkpoint_megabytes']:.0f} MB)"),
        ("   checkpoint load", f"{r['checkpoint_load_seconds']:.3f} s", spread(runs["checkpoint_load"], ".3f")),
        ("5. launch -> first step", f"{r['startup_seconds']:.1f} s",
         f"({r['imports_seconds']:.1f} s imports) + {r['first_step_seconds']:.1f} s first step "
         f"= {r['launch_to_first_step_seconds']:.1f} s"),
    ]
    if r["dataset_load_seconds"] is not None:
        rows.append(("   of which dataset load", f"{r['dataset_load_seconds']:.1f} s", ""))
    rows.append(("loop / bare", f"{r['loop_vs_bare_ratio']:.3f}", f"run by run {spread(runs['loop_vs_bare'], '.3f')}"))
    if r["loop_vs_bare_cpu_ratio"] is not None:
        rows.append(("loop / bare in CPU time", f"{r['loop_vs_bare_cpu_ratio']:.3f}",
                     f"{r['bare_cpu_seconds_per_step']:.2f} vs {r['loop_cpu_seconds_per_step']:.2f} CPU s/step"))
    rows.append(("data / loop", f"{r['data_vs_step_ratio']:.1f}", ""))
    header = (f"distcifar benchmark: {r['device']} ({r['device_name']}), {r['num_threads']} threads, "
              f"{r['num_processes']} process(es), precision {r['mixed_precision']}, channels_last "
              f"{r['channels_last']}, compile {r['compile']}\nbatch {r['batch_size']} = {r['micro_batch_size']} "
              f"per device x {r['grad_accum_steps']} accumulation x {r['num_processes']} | {r['model_parameters'] / 1e6:.2f}M "
              f"parameters | {r['data']} | {r['repetitions']} x {r['steps']} steps after {r['warmup']} warm-up | "
              f"load average {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}")
    width = max(len(name) for name, _, _ in rows)
    lines = [f"  {name:<{width}}  {value:>16}   {detail}".rstrip() for name, value, detail in rows]
    targets = "  targets (seed network, batch 128, 2-core CPU): loop / bare >= 0.95, data / loop >= 20, save <= 0.5 s"
    return "\n".join([header, f"  {'':<{width}}  {'median':>16}   runs", *lines, targets])


if __name__ == "__main__":
    main()
