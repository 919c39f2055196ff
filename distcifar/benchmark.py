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
  2. loop:  train.py's steps: the same engine.build_training and the same engine.optimizer_steps generator
            that train.py drives (augmented batches of a real-size uint8 training set on the device,
            synthetic unless --data.path is set; accumulation, scheduler, logging every
            train.log_every steps to a real Tracker, the stop/timer agreement). No progress bar, no
            evaluation, no checkpoints;
  3. data:  TrainBatches.epoch alone, every micro-batch augmented and consumed, no model;
  4. checkpoint save and load with Checkpointer (to a temporary folder);
  5. startup: seconds from the start of this process to the first optimizer step, and to its end;
  6. utilisation: the training FLOPs per image (utilization.train_flops_per_image, PyTorch's FlopCounterMode),
            the TFLOP/s of (1) and (2), and their share of the peak: on a CPU a 2048x2048 matmul in the run's
            precision timed in turns with (1) and (2), each run's steps against its own matmuls; on a GPU the
            published dense peak of utilization.GPU_PEAKS (unknown for a GPU not in it).

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
speedup / N; --processes 1,2,3 runs the benchmark once per N in a row and prints one table (sweep.py).
Several nodes: run a one-process benchmark, then the multi-node launch with --baseline pointing at its JSON.

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

from distcifar import scaling, sweep, tracking
from distcifar.accelerator import build_accelerator
from distcifar.checkpoint import Checkpointer
from distcifar.config import Config, parse_config
from distcifar.data import Split, TrainBatches, load_splits
from distcifar.engine import Training, build_training, optimizer_steps
from distcifar.errors import UsageError, entry_point
from distcifar.hardware import hardware, wait_for_device
from distcifar.model import DistCifarNet, memory_format, uncompiled
from distcifar.optim import build_optimizer
from distcifar.ranks import end_run, fail_together, print_once, rank_weight_spread
from distcifar.utilization import MATMUL_FLOPS, MATMUL_SIZE, matmuls, peak_memory_gb

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
            yield from micro_batches
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Options


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


# ---------------------------------------------------------------------------------------------
# The measurements, each its own function; main composes them


@dataclasses.dataclass
class Bench:
    """What every measurement runs on: one Accelerator, train.py's construction of a run, and train.py's steps."""

    args: object  # the benchmark's own options
    cfg: Config
    accelerator: object
    training: Training
    checkpoints: Checkpointer
    tracker: tracking.Tracker
    loop: object  # engine.optimizer_steps: train.py's steps, exactly; one item per optimizer step
    scratch: tempfile.TemporaryDirectory | None  # the main process's throwaway output folder
    data_description: str


@dataclasses.dataclass
class Startup:
    """Seconds from the start of this process to the first optimizer step."""

    imports_seconds: float
    startup_seconds: float  # to the first step's start
    first_step_seconds: float
    launch_to_first_step_seconds: float  # to the first step's end
    dataset_load_seconds: float | None  # load_splits with --data.path (importing `datasets` included)


@dataclasses.dataclass
class StepTimes:
    """Images/s and CPU seconds per step of each loop, one entry per timed run ("bare", "loop", "nosync"); on a CPU
    also "peak": TFLOP/s of the matmuls timed in turns with them."""

    runs: dict[str, list[float]]
    nosync_skips_all_reduce: bool | None  # checked under N > 1 processes
    comm_hook_active: bool | None  # ddp.comm_hook compresses in the steps timed (None: no hook)


@dataclasses.dataclass
class CheckpointTimes:
    save_seconds: list[float]
    load_seconds: list[float]
    megabytes: float


def set_up(args, cfg: Config, launched: float, imports_seconds: float) -> tuple[Bench, Startup]:
    """Everything train.py builds, then its first optimizer step (the loop comes first, so that its first step
    measures the startup)."""
    accelerator = build_accelerator(cfg)
    # A throwaway output folder from the main process for all ranks (every rank loads the checkpoints);
    # TemporaryDirectory deletes it at exit, also after an error.
    scratch = tempfile.TemporaryDirectory(prefix="distcifar-bench-") if accelerator.is_main_process else None
    root = [scratch.name if scratch else None]
    broadcast_object_list(root)
    cfg.output_dir, out = root[0], Path(root[0])
    set_seed(cfg.train.seed)
    data_started = time.perf_counter()
    if cfg.data.path:
        with accelerator.main_process_first():
            train_split, eval_split, _ = load_splits(cfg.data, cfg.model.num_classes)
    else:
        train_split = synthetic_split(cfg.data.train_limit or 50_000, cfg.model.num_classes)
        eval_split = train_split.head(cfg.train.eval_batch_size)
    data_seconds = time.perf_counter() - data_started
    training = build_training(cfg, accelerator, train_split, eval_split)
    tracker = tracking.Tracker(accelerator, cfg, out, None, hardware(accelerator))
    checkpoints = Checkpointer.for_run(accelerator, cfg, training)
    state = checkpoints.resume("never")
    state.tracker_run_id = tracker.run_id
    loop = optimizer_steps(
        accelerator, training, cfg, state, tracker=tracker, stop=None, checkpoints=checkpoints, until=sys.maxsize
    )
    data_description = cfg.data.path or f"synthetic ({len(train_split)} images)"
    bench = Bench(args, cfg, accelerator, training, checkpoints, tracker, loop, scratch, data_description)
    startup_seconds = time.time() - launched
    first_step_seconds = timed(loop, 1, accelerator.device)[0]
    startup = Startup(
        imports_seconds,
        startup_seconds,
        first_step_seconds,
        time.time() - launched,
        data_seconds if cfg.data.path else None,
    )
    return bench, startup


def bare_steps(bench: Bench):
    """(1) the bare loop: the same network, micro-batch, precision, layout and optimizer as train.py's."""
    cfg, accelerator = bench.cfg, bench.accelerator
    device, micro_batch, layout = (
        accelerator.device,
        bench.training.batches.micro_batch,
        memory_format(cfg.train.channels_last),
    )
    set_seed(cfg.train.seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    model = DistCifarNet(cfg.model).to(device, memory_format=layout)
    optimizer = build_optimizer(model, cfg.optim)
    if cfg.train.compile:
        model = torch.compile(model)
    images = torch.randn(micro_batch, 3, 32, 32, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, cfg.model.num_classes, (micro_batch,), device=device)
    return bare_loop(
        model,
        optimizer,
        images,
        labels,
        cfg.train.grad_accum_steps,
        dtype,
        cfg.optim.label_smoothing,
        cfg.optim.grad_clip,
    )


def time_steps(bench: Bench) -> StepTimes:
    """(1), (2) and under N > 1 processes (2b), warmed up, then timed in turns: step by step on a CPU (nothing is
    queued, and a burst of load from other jobs then hits every loop alike), run by run on a GPU (so that each loop
    keeps its own queue full)."""
    args, accelerator, device = bench.args, bench.accelerator, bench.accelerator.device
    loops = {"bare": bare_steps(bench), "loop": bench.loop}
    if device.type == "cpu":  # the CPU's peak, under the same load as the steps (a GPU's is published)
        loops["peak"] = matmuls(bench.training.compute.precision)
        timed(loops["peak"], 1, device)
    timed(loops["bare"], args.warmup, device)
    timed(loops["loop"], args.warmup, device)
    skips_all_reduce, hook_active = None, None
    if accelerator.num_processes > 1:
        ddp_model = uncompiled(bench.training.model)  # under torch.compile: the DDP module inside
        # no_sync must skip the all-reduce: identical weights before a no-sync step, different after it
        before = rank_weight_spread(accelerator, bench.training.model)
        loops["nosync"] = without_gradient_sync(ddp_model, bench.loop)
        timed(loops["nosync"], max(1, args.warmup), device)
        skips_all_reduce = before == 0.0 and rank_weight_spread(accelerator, bench.training.model) > 0.0
        if not skips_all_reduce:
            print_once(
                "warning: the no-sync step did not leave the ranks different; its figure is not a step "
                "without communication"
            )
        hook_active = comm_hook_active(ddp_model)
    images_per_step = bench.training.batches.micro_batch * bench.cfg.train.grad_accum_steps  # per process
    runs = {name: [] for loop_name in loops for name in (loop_name, f"{loop_name}_cpu")}
    chunk = 1 if device.type == "cpu" else args.steps
    for repeat in range(args.repeats):
        spent = {name: [0.0, 0.0] for name in loops}  # wall, CPU seconds
        for _ in range(args.steps // chunk):
            for name, steps in loops.items():
                wall, cpu = timed(steps, chunk, device)
                spent[name][0] += wall
                spent[name][1] += cpu
        for name, (wall, cpu) in spent.items():
            work = MATMUL_FLOPS / 1e12 if name == "peak" else images_per_step  # TFLOP/s, else images/s
            runs[name].append(args.steps * work / wall)
            runs[f"{name}_cpu"].append(cpu / args.steps)
        runs_now = ", ".join(f"{name} {runs[name][-1]:.1f}" for name in loops if name != "peak")
        peak = f", the CPU's matmul {runs['peak'][-1]:.3f} TFLOP/s" if "peak" in loops else ""
        print_once(f"  run {repeat + 1}/{args.repeats}: {runs_now} images/s per process{peak}")
    return StepTimes(runs, skips_all_reduce, hook_active)


def time_data(bench: Bench) -> list[float]:
    """(3) micro-batches per second of the data pipeline alone, once per repeat."""
    data, device, count = data_loop(bench.training.batches), bench.accelerator.device, bench.args.data_steps
    timed(data, 2, device)
    return [count / timed(data, count, device)[0] for _ in range(bench.args.repeats)]


def time_checkpoints(bench: Bench) -> CheckpointTimes:
    """(4) a full save and load with the Checkpointer, once per repeat."""
    device, checkpoints = bench.accelerator.device, bench.checkpoints
    times = CheckpointTimes([], [], 0.0)
    for _ in range(bench.args.repeats):
        wait_for_device(device)
        started = time.perf_counter()
        path = checkpoints.save()
        times.save_seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        checkpoints.load(path)
        wait_for_device(device)
        times.load_seconds.append(time.perf_counter() - started)
    times.megabytes = sum(f.stat().st_size for f in path.iterdir()) / 1e6
    return times


def scaling_figures(
    bench: Bench, median: dict[str, float], steps: StepTimes, baseline: dict | None, allreduce_seconds: float | None
) -> dict:
    """What N processes buy (module docstring): per process unless "total"; None where one process has no DDP."""
    accelerator, cfg, world = bench.accelerator, bench.cfg, bench.accelerator.num_processes
    parameters = list(accelerator.unwrap_model(bench.training.model).parameters())
    per_rank = accelerator.gather(torch.tensor([median["loop"]], dtype=torch.float64, device=accelerator.device))
    total = sum(per_rank.tolist())
    # the bytes of the steps timed: a PowerSGD hook still in its warm-up all-reduces the whole gradient
    hook = cfg.ddp.comm_hook if steps.comm_hook_active else "none"
    payload = scaling.gradient_bytes(parameters, hook, cfg.ddp.powersgd_rank)
    images_per_step = bench.training.batches.micro_batch * cfg.train.grad_accum_steps
    compute_seconds = images_per_step / (median["nosync"] if world > 1 else median["loop"])
    link_gbps, predicted_share = None, None
    if world > 1:
        link_gbps = scaling.ring_bytes(scaling.gradient_bytes(parameters), world) / allreduce_seconds / 1e9
        bucket_bytes = cfg.ddp.bucket_cap_mb * 2**20
        predicted_share = scaling.predict(
            compute_seconds, payload, world, link_gbps, bucket_bytes=bucket_bytes
        ).communication_share
    speedup = total / baseline["loop_images_per_second"] if baseline else None
    return {
        "total_images_per_second": total,
        "rank_images_per_second": per_rank.tolist(),
        "nosync_images_per_second": median["nosync"] if world > 1 else None,
        "communication_share": median["communication_share"] if world > 1 else None,
        "nosync_skips_all_reduce": steps.nosync_skips_all_reduce,
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
        "comm_hook_active": steps.comm_hook_active,
    }


def describe(bench: Bench, load_average: list[float]) -> dict:
    """What was measured, on what, with which settings."""
    accelerator, cfg, args = bench.accelerator, bench.cfg, bench.args
    parameters = accelerator.unwrap_model(bench.training.model).parameters()
    return {
        "device": str(accelerator.device),
        "device_name": hardware(accelerator)["device_name"],
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
        "batch_size": cfg.train.batch_size,
        "micro_batch_size": bench.training.batches.micro_batch,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "log_every": cfg.train.log_every,
        "model_parameters": sum(p.numel() for p in parameters),
        "data": bench.data_description,
        "warmup": args.warmup,
        "steps": args.steps,
        "repetitions": args.repeats,
        "data_steps": args.data_steps,
        "quick": args.quick,
        "load_average": load_average,
        "torch_version": torch.__version__,
        "accelerate_version": accelerate.__version__,
    }


@entry_point
def main(argv: list[str] | None = None) -> dict:
    launched = psutil.Process().create_time()  # wall clock at process start (imports included)
    imports_seconds = time.time() - launched
    argv = sys.argv[1:] if argv is None else argv
    args, cfg = parse(argv)
    if args.processes:
        return sweep.sweep(args, cfg, argv)
    if args.step_seconds:
        return sweep.predict_only(args, cfg)
    cfg.tracking.report_to, cfg.tracking.plots, cfg.resume = "none", False, "never"
    load_average = [os.getloadavg()[0]]
    bench, startup = set_up(args, cfg, launched, imports_seconds)  # (2) first: its first step is (5)
    accelerator, world = bench.accelerator, bench.accelerator.num_processes
    parameters = list(accelerator.unwrap_model(bench.training.model).parameters())
    baseline = (
        read_baseline(accelerator, args.baseline, cfg, sum(p.numel() for p in parameters)) if args.baseline else None
    )
    steps = time_steps(bench)  # (1), (2), (2b)
    # The all-reduce of the uncompressed gradient alone: the link's bandwidth, for the model
    allreduce_seconds = (
        scaling.measure_all_reduce(scaling.gradient_bytes(parameters), accelerator.device) if world > 1 else None
    )
    runs = {**steps.runs, "data": time_data(bench)}  # (3)
    checkpoints = time_checkpoints(bench)  # (4)
    runs["checkpoint_save"], runs["checkpoint_load"] = checkpoints.save_seconds, checkpoints.load_seconds
    bench.tracker.finish()
    accelerator.wait_for_everyone()
    load_average.append(os.getloadavg()[0])

    add_paired_ratios(runs, bench.training.compute.flops_per_image, world)
    median = {name: statistics.median(values) for name, values in runs.items()}
    result = {
        **speed_figures(median, bench.training.batches.micro_batch, accelerator.device, checkpoints),
        **dataclasses.asdict(startup),
        **describe(bench, load_average),
        **scaling_figures(bench, median, steps, baseline, allreduce_seconds),
        **utilization_figures(bench, median),
        "prediction": None,
        "runs": runs,
    }
    if args.predict:
        result["prediction"], table = scaling.prediction_table(
            result["compute_seconds_per_step"],
            result["gradient_megabytes"] * 1e6,
            args.predict,
            args.bandwidth,
            cfg.ddp.bucket_cap_mb * 2**20,
            args.target,
        )
    if accelerator.is_main_process:
        print(report(result), flush=True)
        if args.predict:
            print(table, flush=True)
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        bench.scratch.cleanup()
    end_run(accelerator)  # every rank together; skips the teardown that can abort with several processes
    return result


def add_paired_ratios(runs: dict[str, list[float]], flops_per_image: float, world: int) -> None:
    """Ratios of figures timed in the same run (so under the same load), run by run: loop/bare, each step's share of
    the matmul peak timed in turns with it, and with several processes the communication share 1 - t_nosync/t_sync."""
    runs["loop_vs_bare"] = [loop / bare for loop, bare in zip(runs["loop"], runs["bare"])]
    if "peak" in runs:
        for name in ("bare", "loop"):
            runs[f"{name}_mfu"] = [ips * flops_per_image / 1e12 / peak for ips, peak in zip(runs[name], runs["peak"])]
    if world > 1:
        runs["communication_share"] = [1 - loop / nosync for loop, nosync in zip(runs["loop"], runs["nosync"])]


def speed_figures(
    median: dict[str, float], micro_batch: int, device: torch.device, checkpoints: CheckpointTimes
) -> dict:
    """The medians of (1)-(4), and the ratios the targets are stated in."""
    return {
        "bare_images_per_second": median["bare"],
        "loop_images_per_second": median["loop"],
        "data_images_per_second": median["data"] * micro_batch,
        "data_batches_per_second": median["data"],
        "loop_vs_bare_ratio": median["loop"] / median["bare"],
        "data_vs_step_ratio": median["data"] * micro_batch / median["loop"],
        # CPU seconds per optimizer step: steadier than images/s on a shared CPU, meaningless on a GPU.
        "bare_cpu_seconds_per_step": median["bare_cpu"],
        "loop_cpu_seconds_per_step": median["loop_cpu"],
        "loop_vs_bare_cpu_ratio": median["bare_cpu"] / median["loop_cpu"] if device.type == "cpu" else None,
        "checkpoint_save_seconds": median["checkpoint_save"],
        "checkpoint_load_seconds": median["checkpoint_load"],
        "checkpoint_megabytes": checkpoints.megabytes,
    }


def utilization_figures(bench: Bench, median: dict[str, float]) -> dict:
    """(6) per process: FLOPs per image, the TFLOP/s of (1) and (2), the peak and their share of it (None where the
    peak is not known), and the most memory this process has held."""
    compute, device, world = bench.training.compute, bench.accelerator.device, bench.accelerator.num_processes
    figures = {
        "train_flops_per_image": compute.flops_per_image,
        "compute_precision": compute.precision,
        "bare_tflops": compute.tflops(median["bare"]),
        "loop_tflops": compute.tflops(median["loop"]),
        "peak_memory_gb": peak_memory_gb(device),
    }
    if "peak" in median:  # a CPU: measured in turns with the steps
        figures.update(
            peak_tflops=median["peak"],
            peak_source=f"{compute.precision} {MATMUL_SIZE}x{MATMUL_SIZE} matmul, timed in turns with the steps",
            bare_mfu=median["bare_mfu"],
            loop_mfu=median["loop_mfu"],
        )
    else:
        peak = compute.peak_tflops / world if compute.peak_tflops else None
        figures.update(
            peak_tflops=peak,
            peak_source=compute.peak_source,
            bare_mfu=figures["bare_tflops"] / peak if peak else None,
            loop_mfu=figures["loop_tflops"] / peak if peak else None,
        )
    return figures


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
    if wrong:  # every rank read the same broadcast record
        fail_together(
            accelerator,
            UsageError,
            f"--baseline must be a one-process run of the same config: {wrong}",
            same_on_every_rank=True,
        )
    return baseline


def _spread(values: list[float], spec: str) -> str:
    return " ".join(format(v, spec) for v in values)


def report(r: dict) -> str:
    """The benchmark's printed table: a header, then one row per figure (median, then each run)."""
    rows = _rows(r) + (_scaling_rows(r) if r["num_processes"] > 1 else [])
    header = (
        f"distcifar benchmark: {r['device']} ({r['device_name']}), {r['num_threads']} threads, "
        f"{r['num_processes']} process(es), precision {r['mixed_precision']}, channels_last "
        f"{r['channels_last']}, compile {r['compile']}\nbatch {r['batch_size']} = {r['micro_batch_size']} "
        f"per device x {r['grad_accum_steps']} accumulation x {r['num_processes']} | "
        f"{r['model_parameters'] / 1e6:.2f}M parameters | {r['data']} | {r['repetitions']} x {r['steps']} steps "
        f"after {r['warmup']} warm-up | load average {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f}"
    )
    width = max(len(name) for name, _, _ in rows)
    lines = [f"  {name:<{width}}  {value:>16}   {detail}".rstrip() for name, value, detail in rows]
    targets = "  targets (seed network, batch 128, 2-core CPU): loop / bare >= 0.95, data / loop >= 20, save <= 0.5 s"
    return "\n".join([header, f"  {'':<{width}}  {'median':>16}   runs", *lines, targets])


def _rows(r: dict) -> list[tuple[str, str, str]]:
    runs = r["runs"]
    rows = [
        ("1. bare PyTorch step", f"{r['bare_images_per_second']:.1f} images/s", _spread(runs["bare"], ".1f")),
        ("2. train.py step", f"{r['loop_images_per_second']:.1f} images/s", _spread(runs["loop"], ".1f")),
        (
            "3. data pipeline",
            f"{r['data_images_per_second']:.0f} images/s",
            f"{r['data_batches_per_second']:.1f} batches/s",
        ),
        (
            "4. checkpoint save",
            f"{r['checkpoint_save_seconds']:.3f} s",
            f"{_spread(runs['checkpoint_save'], '.3f')} ({r['checkpoint_megabytes']:.0f} MB)",
        ),
        ("   checkpoint load", f"{r['checkpoint_load_seconds']:.3f} s", _spread(runs["checkpoint_load"], ".3f")),
        (
            "5. launch -> first step",
            f"{r['startup_seconds']:.1f} s",
            f"({r['imports_seconds']:.1f} s imports) + {r['first_step_seconds']:.1f} s first step "
            f"= {r['launch_to_first_step_seconds']:.1f} s",
        ),
    ]
    if r["dataset_load_seconds"] is not None:
        rows.append(("   of which dataset load", f"{r['dataset_load_seconds']:.1f} s", ""))
    rows.append(("loop / bare", f"{r['loop_vs_bare_ratio']:.3f}", f"run by run {_spread(runs['loop_vs_bare'], '.3f')}"))
    if r["loop_vs_bare_cpu_ratio"] is not None:
        cpu = f"{r['bare_cpu_seconds_per_step']:.2f} vs {r['loop_cpu_seconds_per_step']:.2f} CPU s/step"
        rows.append(("loop / bare in CPU time", f"{r['loop_vs_bare_cpu_ratio']:.3f}", cpu))
    rows.append(("data / loop", f"{r['data_vs_step_ratio']:.1f}", ""))
    rows.append(
        (
            "6. training FLOPs per image",
            f"{r['train_flops_per_image'] / 1e9:.3g} GFLOP",
            "forward + backward, as FlopCounterMode counts them",
        )
    )
    if r["peak_tflops"] is None:
        rows.append(("   peak", "unknown", r["peak_source"]))
        return rows
    peak_runs = f"runs {_spread(runs['peak'], '.3f')}; " if "peak" in runs else ""
    rows.append(("   peak", f"{r['peak_tflops']:.3g} TFLOP/s", f"{peak_runs}{r['peak_source']}"))
    for name, label in (("bare", "1."), ("loop", "2.")):
        spread = f"run by run {_spread(runs[name + '_mfu'], '.1%')}" if name + "_mfu" in runs else ""
        rows.append(
            (
                f"   utilisation of {label}",
                f"{r[name + '_mfu']:.1%}",
                f"{r[name + '_tflops']:.3g} TFLOP/s" + (f"; {spread}" if spread else ""),
            )
        )
    return rows


def _scaling_rows(r: dict) -> list[tuple[str, str, str]]:
    runs, n = r["runs"], r["num_processes"]
    warming_up = " (in its warm-up: whole gradient; see ddp.powersgd_start_step)"
    hook = r["ddp"]["comm_hook"] + ("" if r["comm_hook_active"] is not False else warming_up)
    checked = "" if r["nosync_skips_all_reduce"] else "  (NOT checked: see warning)"
    shares = _spread(runs["communication_share"], ".1%")
    speedup = (
        ""
        if r["speedup"] is None
        else f"{r['speedup']:.2f} x one process ({r['baseline_images_per_second']:.1f}), "
        f"scaling efficiency {r['scaling_efficiency']:.2f}"
    )
    return [
        (
            "2b. train.py step, no grad sync",
            f"{r['nosync_images_per_second']:.1f} images/s",
            _spread(runs["nosync"], ".1f") + checked,
        ),
        (
            "communication share",
            f"{r['communication_share']:.1%}",
            f"run by run {shares}; model {r['predicted_communication_share']:.1%}",
        ),
        (
            "gradient all-reduce",
            f"{r['gradient_megabytes']:.1f} MB/step",
            f"comm_hook {hook}; the fp32 gradient alone: {r['allreduce_seconds'] * 1e3:.0f} ms, "
            f"{r['link_gbps']:.2f} GB/s bus bandwidth",
        ),
        (f"total over {n} processes", f"{r['total_images_per_second']:.1f} images/s", speedup),
    ]


if __name__ == "__main__":
    main()
