"""How close does the training loop come to a bare PyTorch loop on this machine?

    python -m distcifar.benchmark [--config FILE] [--section.field VALUE ...] [--warmup 2] [--steps 5] (GPU: 20, 100)
                                  [--repeats 3] [--quick] [--output bench.json] [--baseline one.json]
                                  [--predict 2,8,64 [--bandwidth nvlink,ib-ndr,12.5] [--target 0.2]]
    accelerate launch -m distcifar.benchmark ...      (or: accelerate launch distcifar/benchmark.py ...)
    python -m distcifar.benchmark --processes 1,2,3 ...     (launches itself once per N: a scaling table)
    python -m distcifar.benchmark --step_seconds 0.001 --predict 2,8,64     (the model alone, no measuring)

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

Under N > 1 processes (DDP) it also times
  2b. nosync: the same train.py steps with DDP's gradient synchronisation switched off (each step
            driven inside model.no_sync()), taking turns with (1) and (2). The benchmark checks that it
            does skip the all-reduce (the ranks' weights are identical before a no-sync step and differ
            after it). no_sync also skips DDP's broadcast of the BatchNorm buffers from rank 0 at the
            next forward; those are ~0.1% of the gradient's bytes;
and reports communication_share = 1 - t_nosync / t_sync (paired run by run: the part of a step that
DDP's communication adds, after what it overlaps with the backward pass), total_images_per_second
(the sum over ranks), gradient_megabytes (the bytes each process hands to the all-reduce per optimizer
step, after ddp.comm_hook's compression: scaling.gradient_bytes), one all-reduce of the uncompressed
gradient timed alone (allreduce_seconds, link_gbps: the bus bandwidth 2 (N-1)/N x bytes / s), and what
the model of distcifar/scaling.py predicts from those (predicted_communication_share). On one process
these are None (there is no DDP), and total_images_per_second is the train.py figure.

Scaling efficiency needs a one-process figure of the same config on the same machine: --baseline FILE
(the JSON of a one-process run) gives speedup = total / one-process images/s and scaling_efficiency =
speedup / N; --processes 1,2,3 runs the benchmark once per N in a row (N = 1 plainly, N > 1 through
`accelerate launch --config_file launch/cpu_multi.yaml` without a GPU, launch/multi_gpu.yaml with one,
each N after the one before, each with --baseline of the N = 1 run) and prints one table. Several
nodes: run a one-process benchmark, then the multi-node launch with --baseline pointing at its JSON.

--predict N,... prints the model's efficiency for those process counts over each --bandwidth link
(names from scaling.LINKS, or GB/s), from the step time just measured (the no-sync step, or the
one-process step), and the gradient accumulation that keeps communication under --target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
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

from distcifar import scaling, tracking
from distcifar.checkpoint import Checkpointer
from distcifar.cli import RunFailed, UsageError, entry_point
from distcifar.config import parse_config
from distcifar.data import Split, TrainBatches, load_splits
from distcifar.engine import RunState, build, optimizer_steps, rank_weight_spread, wait_for_device
from distcifar.model import DistCifarNet
from distcifar.optim import build_optimizer
from distcifar.runtime import build_accelerator, hardware, leave

# Tiny settings for --quick (CI): the network, batch and data shrink; explicit overrides still win.
QUICK_OVERRIDES = [
    "--model.block_channels",
    "[8,8,16,16,32,32]",
    "--model.classifier_hidden",
    "[32]",
    "--train.batch_size",
    "32",
    "--data.train_limit",
    "1024",
]
QUICK_COUNTS = dict(warmup=1, steps=2, repeats=1, data_steps=4)
# On a GPU 5 steps take ~0.1 s: too short to time, and the first steps include cuDNN's algorithm search.
GPU_COUNTS = dict(warmup=20, steps=100)


def timed(steps, count: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process's threads) for `count` more items of the generator `steps`.

    On a CPU shared with other jobs the wall time swings with their load; the CPU time much less."""
    wait_for_device(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        next(steps)
    wait_for_device(device)
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


def without_gradient_sync(ddp_model, steps):
    """The items of `steps` (train.py's optimizer steps), each taken inside DDP's no_sync(): the same work
    without the gradient all-reduce (accelerator.accumulate's own no_sync nests in it and restores it)."""
    while True:
        with ddp_model.no_sync():
            item = next(steps)
        yield item


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
    parser.add_argument(
        "--warmup", type=int, default=2, help="Untimed optimizer steps before timing (each loop; 20 on a GPU)."
    )
    parser.add_argument("--steps", type=int, default=5, help="Optimizer steps per timed run (100 on a GPU).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed runs of each loop; the median is reported.")
    parser.add_argument("--data_steps", type=int, default=50, help="Micro-batches per timed run of the data pipeline.")
    parser.add_argument("--quick", action="store_true", help="Tiny model and counts: proves that it runs (CI).")
    parser.add_argument("--output", type=str, default=None, help="Also write the figures to this JSON file.")
    parser.add_argument(
        "--baseline",
        type=str,
        default=None,
        help="JSON of a one-process run of this benchmark (same config): speedup and scaling efficiency.",
    )
    parser.add_argument(
        "--processes",
        type=str,
        default=None,
        help="Comma-separated process counts (e.g. 1,2,3): launch this benchmark once per count, one table.",
    )
    parser.add_argument(
        "--predict",
        type=str,
        default=None,
        help="Comma-separated process counts: print the scaling model's efficiency for them.",
    )
    parser.add_argument(
        "--bandwidth",
        type=str,
        default=",".join(scaling.LINKS),
        help=f"Comma-separated links for --predict: GB/s, or names ({', '.join(scaling.LINKS)}).",
    )
    parser.add_argument("--target", type=float, default=0.2, help="--predict: the communication share to stay under.")
    parser.add_argument(
        "--step_seconds",
        type=float,
        default=None,
        help="--predict from this compute time per optimizer step instead of measuring one.",
    )


def parse(argv: list[str]):
    defaults = []
    if not torch.cuda.is_available() and not any(a == "--config" or a.startswith("--config=") for a in argv):
        defaults += ["--train.batch_size", "128"]
    if "--quick" in argv:  # its defaults go first, so that options given explicitly still win
        defaults += QUICK_OVERRIDES
        defaults += [f"--{name}={value}" for name, value in QUICK_COUNTS.items()]
    elif torch.cuda.is_available():
        defaults += [f"--{name}={value}" for name, value in GPU_COUNTS.items()]
    cfg, args = parse_config(
        defaults + argv, prog="distcifar-benchmark", description=__doc__, add_arguments=add_arguments
    )
    if min(args.steps, args.repeats, args.data_steps) < 1 or args.warmup < 0:
        raise UsageError("--steps, --repeats and --data_steps must be >= 1, --warmup >= 0")
    args.predict = counts(args.predict, "--predict")
    args.processes = counts(args.processes, "--processes")
    args.bandwidth = [link.strip() for link in str(args.bandwidth).split(",")]
    try:
        for link in args.bandwidth:
            scaling.parse_link(link)
    except ValueError as err:
        raise UsageError(f"--bandwidth: {err}") from None
    if not 0 < args.target < 1:
        raise UsageError(f"--target must be between 0 and 1, got {args.target}")
    if args.step_seconds is not None and (args.step_seconds <= 0 or not args.predict):
        raise UsageError("--step_seconds needs a value > 0 and --predict N,...")
    if args.processes and (args.baseline or args.step_seconds):
        raise UsageError("--processes measures its own baseline; leave out --baseline and --step_seconds")
    return args, cfg


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


@entry_point
def main(argv: list[str] | None = None) -> dict:
    launched = psutil.Process().create_time()  # wall clock at process start (imports included)
    imports_seconds = time.time() - launched
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = parse(argv)
    if args.processes:
        return sweep(args, cfg, argv)
    if args.step_seconds:
        return predict_only(args, cfg)
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
    parameters = list(accelerator.unwrap_model(parts.model).parameters())
    baseline = (
        read_baseline(accelerator, args.baseline, cfg, sum(p.numel() for p in parameters)) if args.baseline else None
    )
    run_hardware = hardware(accelerator)
    tracker = tracking.Tracker(accelerator, cfg, out, None, run_hardware)
    checkpoints = Checkpointer(accelerator, out / "checkpoints", cfg.checkpoint, cfg.to_dict())
    state = RunState(tracker_run_id=tracker.run_id)
    loop = optimizer_steps(
        accelerator, parts, cfg, state, tracker=tracker, stop=None, checkpoints=checkpoints, until=sys.maxsize
    )  # train.py's steps, exactly; one item per optimizer step
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
    bare = bare_loop(
        bare_model,
        bare_optimizer,
        images,
        labels,
        cfg.train.grad_accum_steps,
        dtype,
        cfg.optim.label_smoothing,
        cfg.optim.grad_clip,
    )

    # Warm up, then time them in turn -------------------------------------------------------------
    timed(bare, args.warmup, device)
    timed(loop, args.warmup, device)
    loops = {"bare": bare, "loop": loop}
    ddp_model = getattr(parts.model, "_orig_mod", parts.model)  # under torch.compile: the DDP module inside
    nosync_skips_all_reduce, hook_active = None, None
    if world > 1:
        # no_sync must skip the all-reduce: identical weights before a no-sync step, different after it
        before = rank_weight_spread(accelerator, parts.model)
        loops["nosync"] = without_gradient_sync(ddp_model, loop)
        timed(loops["nosync"], max(1, args.warmup), device)
        nosync_skips_all_reduce = before == 0.0 and rank_weight_spread(accelerator, parts.model) > 0.0
        if not nosync_skips_all_reduce:
            accelerator.print(
                "warning: the no-sync step did not leave the ranks different; its figure is not "
                "a step without communication",
                flush=True,
            )
        hook_active = comm_hook_active(ddp_model)
    images_per_step = batches.micro_batch * cfg.train.grad_accum_steps  # per process
    runs = {name: [] for loop_name in loops for name in (loop_name, f"{loop_name}_cpu")}
    # On a CPU take turns step by step: nothing is queued, and a burst of load from other jobs then hits
    # every loop alike. On a GPU take turns run by run, so that each loop keeps its own queue full.
    chunk = 1 if device.type == "cpu" else args.steps
    for repeat in range(args.repeats):
        spent = {name: [0.0, 0.0] for name in loops}  # wall, CPU seconds
        for _ in range(args.steps // chunk):
            for name, steps in loops.items():
                wall, cpu = timed(steps, chunk, device)
                spent[name][0] += wall
                spent[name][1] += cpu
        for name, (wall, cpu) in spent.items():
            runs[name].append(args.steps * images_per_step / wall)
            runs[f"{name}_cpu"].append(cpu / args.steps)
        accelerator.print(
            f"  run {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{name} {runs[name][-1]:.1f}" for name in loops)
            + " images/s per process",
            flush=True,
        )
    del loops, bare, bare_model, bare_optimizer

    # The all-reduce of the uncompressed gradient alone: the link's bandwidth, for the model ---------
    full_payload = scaling.gradient_bytes(parameters)
    allreduce_seconds = scaling.measure_all_reduce(full_payload, device) if world > 1 else None

    # 3. the data pipeline alone --------------------------------------------------------------
    data = data_loop(batches)
    timed(data, 2, device)
    runs["data"] = [args.data_steps / timed(data, args.data_steps, device)[0] for _ in range(args.repeats)]

    # 4. checkpoints ----------------------------------------------------------------------
    runs["checkpoint_save"], runs["checkpoint_load"] = [], []
    for repeat in range(args.repeats):
        wait_for_device(device)
        started = time.perf_counter()
        path = checkpoints.save(state, model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler)
        runs["checkpoint_save"].append(time.perf_counter() - started)
        started = time.perf_counter()
        checkpoints.load(path, model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler)
        wait_for_device(device)
        runs["checkpoint_load"].append(time.perf_counter() - started)
    checkpoint_bytes = sum(f.stat().st_size for f in path.iterdir())
    tracker.finish()
    accelerator.wait_for_everyone()
    load_average.append(os.getloadavg()[0])

    runs["loop_vs_bare"] = [loop / bare for loop, bare in zip(runs["loop"], runs["bare"])]  # paired: same load
    if world > 1:  # 1 - t_nosync / t_sync, run by run
        runs["communication_share"] = [1 - loop / nosync for loop, nosync in zip(runs["loop"], runs["nosync"])]
    median = {name: statistics.median(values) for name, values in runs.items()}
    per_rank = accelerator.gather(torch.tensor([median["loop"]], dtype=torch.float64, device=device)).tolist()
    total = sum(per_rank)
    # the bytes of the steps timed: a PowerSGD hook still in its warm-up all-reduces the whole gradient
    payload = scaling.gradient_bytes(parameters, cfg.ddp.comm_hook if hook_active else "none", cfg.ddp.powersgd_rank)
    compute_seconds = images_per_step / (median["nosync"] if world > 1 else median["loop"])
    link_gbps = scaling.ring_bytes(full_payload, world) / allreduce_seconds / 1e9 if world > 1 else None
    predicted_share = (
        scaling.predict(
            compute_seconds, payload, world, link_gbps, bucket_bytes=cfg.ddp.bucket_cap_mb * 2**20
        ).communication_share
        if world > 1
        else None
    )
    speedup = total / baseline["loop_images_per_second"] if baseline else None
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
        "model_parameters": sum(p.numel() for p in parameters),
        "data": cfg.data.path or f"synthetic ({len(train_split)} images)",
        "warmup": args.warmup,
        "steps": args.steps,
        "repetitions": args.repeats,
        "data_steps": args.data_steps,
        "quick": args.quick,
        "load_average": load_average,
        # Scaling (module docstring); per process unless "total"; None where one process has no DDP
        "total_images_per_second": total,
        "rank_images_per_second": per_rank,
        "nosync_images_per_second": median["nosync"] if world > 1 else None,
        "communication_share": median["communication_share"] if world > 1 else None,
        "nosync_skips_all_reduce": nosync_skips_all_reduce,
        "compute_seconds_per_step": compute_seconds,
        "gradient_megabytes": payload / 1e6,
        "allreduce_megabytes_per_process": scaling.ring_bytes(payload, world) / 1e6,
        "allreduce_seconds": allreduce_seconds,
        "link_gbps": link_gbps,
        "predicted_communication_share": predicted_share,
        "baseline_images_per_second": baseline["loop_images_per_second"] if baseline else None,
        "speedup": speedup,
        "scaling_efficiency": speedup / world if baseline else None,
        "ddp": dataclasses.asdict(cfg.ddp),
        "comm_hook_active": hook_active,
        "prediction": None,
        "torch_version": torch.__version__,
        "accelerate_version": accelerate.__version__,
        "runs": runs,
    }
    if args.predict:
        result["prediction"], table = scaling.prediction_table(
            compute_seconds, payload, args.predict, args.bandwidth, cfg.ddp.bucket_cap_mb * 2**20, args.target
        )
    if accelerator.is_main_process:
        print(report(result), flush=True)
        if args.predict:
            print(table, flush=True)
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        scratch.cleanup()
    leave(accelerator)  # every rank together; skips the teardown that can abort with several processes
    return result


def comm_hook_active(ddp_model) -> bool | None:
    """Whether DDP's comm hook compresses now (None: no hook). PowerSGD all-reduces the whole gradient
    until its start step."""
    hooks = getattr(ddp_model, "_comm_hooks", [])
    if not hooks:
        return None
    state = hooks[0][1]
    return state.iter >= state.start_powerSGD_iter if hasattr(state, "start_powerSGD_iter") else True


def read_baseline(accelerator, path: str, cfg, parameters: int) -> dict:
    """The one-process JSON of --baseline, read by the main process (the others may not see its file),
    refused unless it measured the same network, batch and precision."""
    found = [None]
    if accelerator.is_main_process:
        try:
            found[0] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            found[0] = {"error": f"--baseline {path}: {err}"}
    broadcast_object_list(found)
    baseline = found[0]
    want = {
        "num_processes": 1,
        "batch_size": cfg.train.batch_size,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "model_parameters": parameters,
        "mixed_precision": accelerator.mixed_precision,
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
    }
    wrong = baseline.get("error") or ", ".join(
        f"{key} {baseline.get(key)!r} (here {value!r})" for key, value in want.items() if baseline.get(key) != value
    )
    if wrong:
        raise UsageError(
            f"--baseline must be a one-process run of the same config: {wrong}" if accelerator.is_main_process else ""
        )
    return baseline


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
    import socket

    batch, accum = cfg.train.batch_size, cfg.train.grad_accum_steps
    uneven = [n for n in args.processes if batch % (n * accum)]
    if uneven:  # refuse before the first run rather than after it
        multiple = math.lcm(*args.processes) * accum
        raise UsageError(
            f"--processes: train.batch_size {batch} does not split over {uneven} processes x {accum} "
            f"accumulation; use a multiple of {multiple} (e.g. --train.batch_size {multiple * 64})"
        )
    root = Path(__file__).resolve().parent.parent
    accelerate_bin = Path(sys.executable).parent / "accelerate"
    launch_file = root / "launch" / ("multi_gpu.yaml" if torch.cuda.is_available() else "cpu_multi.yaml")
    child_args = without_options(argv, "--processes", "--output", "--baseline")
    results = {}
    with tempfile.TemporaryDirectory(prefix="distcifar-sweep-") as folder:
        for n in sorted(set(args.processes) | {1}):
            output = Path(folder) / f"{n}.json"
            if n == 1:
                command = [sys.executable, "-m", "distcifar.benchmark", *child_args, "--output", str(output)]
            else:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", 0))
                    port = sock.getsockname()[1]
                command = [
                    str(accelerate_bin) if accelerate_bin.exists() else "accelerate",
                    "launch",
                    "--config_file",
                    str(launch_file),
                    "--num_processes",
                    str(n),
                    "--main_process_port",
                    str(port),
                    "-m",
                    "distcifar.benchmark",
                    *child_args,
                    "--output",
                    str(output),
                    "--baseline",
                    str(Path(folder) / "1.json"),
                ]
            print(f"== {n} process(es): {' '.join(command)}", flush=True)
            if subprocess.run(command, cwd=root).returncode != 0 or not output.exists():
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


def report(r: dict) -> str:
    runs = r["runs"]
    spread = lambda values, fmt: " ".join(format(v, fmt) for v in values)  # noqa: E731
    rows = [
        ("1. bare PyTorch step", f"{r['bare_images_per_second']:.1f} images/s", spread(runs["bare"], ".1f")),
        ("2. train.py step", f"{r['loop_images_per_second']:.1f} images/s", spread(runs["loop"], ".1f")),
        (
            "3. data pipeline",
            f"{r['data_images_per_second']:.0f} images/s",
            f"{r['data_batches_per_second']:.1f} batches/s",
        ),
        (
            "4. checkpoint save",
            f"{r['checkpoint_save_seconds']:.3f} s",
            f"{spread(runs['checkpoint_save'], '.3f')} ({r['checkpoint_megabytes']:.0f} MB)",
        ),
        ("   checkpoint load", f"{r['checkpoint_load_seconds']:.3f} s", spread(runs["checkpoint_load"], ".3f")),
        (
            "5. launch -> first step",
            f"{r['startup_seconds']:.1f} s",
            f"({r['imports_seconds']:.1f} s imports) + {r['first_step_seconds']:.1f} s first step "
            f"= {r['launch_to_first_step_seconds']:.1f} s",
        ),
    ]
    if r["dataset_load_seconds"] is not None:
        rows.append(("   of which dataset load", f"{r['dataset_load_seconds']:.1f} s", ""))
    rows.append(("loop / bare", f"{r['loop_vs_bare_ratio']:.3f}", f"run by run {spread(runs['loop_vs_bare'], '.3f')}"))
    if r["loop_vs_bare_cpu_ratio"] is not None:
        rows.append(
            (
                "loop / bare in CPU time",
                f"{r['loop_vs_bare_cpu_ratio']:.3f}",
                f"{r['bare_cpu_seconds_per_step']:.2f} vs {r['loop_cpu_seconds_per_step']:.2f} CPU s/step",
            )
        )
    rows.append(("data / loop", f"{r['data_vs_step_ratio']:.1f}", ""))
    if r["num_processes"] > 1:
        n = r["num_processes"]
        hook = r["ddp"]["comm_hook"] + (
            ""
            if r["comm_hook_active"] is not False
            else " (in its warm-up: whole gradient; see ddp.powersgd_start_step)"
        )
        rows += [
            (
                "2b. train.py step, no grad sync",
                f"{r['nosync_images_per_second']:.1f} images/s",
                spread(runs["nosync"], ".1f")
                + ("" if r["nosync_skips_all_reduce"] else "  (NOT checked: see warning)"),
            ),
            (
                "communication share",
                f"{r['communication_share']:.1%}",
                f"run by run {spread(runs['communication_share'], '.1%')}; model {r['predicted_communication_share']:.1%}",
            ),
            (
                "gradient all-reduce",
                f"{r['gradient_megabytes']:.1f} MB/step",
                f"comm_hook {hook}; the fp32 gradient alone: {r['allreduce_seconds'] * 1e3:.0f} ms, "
                f"{r['link_gbps']:.2f} GB/s bus bandwidth",
            ),
            (
                f"total over {n} processes",
                f"{r['total_images_per_second']:.1f} images/s",
                ""
                if r["speedup"] is None
                else f"{r['speedup']:.2f} x one process ({r['baseline_images_per_second']:.1f}), "
                f"scaling efficiency {r['scaling_efficiency']:.2f}",
            ),
        ]
    header = (
        f"distcifar benchmark: {r['device']} ({r['device_name']}), {r['num_threads']} threads, "
        f"{r['num_processes']} process(es), precision {r['mixed_precision']}, channels_last "
        f"{r['channels_last']}, compile {r['compile']}\nbatch {r['batch_size']} = {r['micro_batch_size']} "
        f"per device x {r['grad_accum_steps']} accumulation x {r['num_processes']} | {r['model_parameters'] / 1e6:.2f}M "
        f"parameters | {r['data']} | {r['repetitions']} x {r['steps']} steps after {r['warmup']} warm-up | "
        f"load average {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}"
    )
    width = max(len(name) for name, _, _ in rows)
    lines = [f"  {name:<{width}}  {value:>16}   {detail}".rstrip() for name, value, detail in rows]
    targets = "  targets (seed network, batch 128, 2-core CPU): loop / bare >= 0.95, data / loop >= 20, save <= 0.5 s"
    return "\n".join([header, f"  {'':<{width}}  {'median':>16}   runs", *lines, targets])


if __name__ == "__main__":
    main()
