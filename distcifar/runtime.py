"""The process around training: the Accelerator with its launcher checks and DDP options, printing once, agreeing
across ranks, stop signals and the output folder's lock."""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DDPCommunicationHookType,
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    parse_flag_from_env,
)

from distcifar.cli import UsageError

if TYPE_CHECKING:
    from distcifar.config import Config, DDPConfig


def print_once(*args) -> None:
    """Print on the main process only (accelerator.print prints once per node)."""
    if PartialState().is_main_process:
        print(*args, flush=True)


def build_accelerator(cfg: Config, log_with: str = "none") -> Accelerator:
    """The one Accelerator of a run, after refusing launches that would train unsynchronised copies."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        raise UsageError(
            f"srun started {os.environ['SLURM_STEP_NUM_TASKS']} tasks of train.py without a launcher; refusing to "
            "train unsynchronised copies. Use `sbatch slurm/train.sh` (one accelerate launch per node)."
        )
    # ACCELERATE_USE_CPU: launch/cpu.yaml (or --cpu) on a machine that has GPUs.
    on_gpu = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    precision = resolve_precision(cfg.train.mixed_precision, on_gpu)
    if precision == "fp16" and not on_gpu:
        raise UsageError("train.mixed_precision fp16 needs a GPU (Accelerate ignores it on CPU); use bf16 or no")
    # Every batch has the same shape, so cuDNN's one-time search for the fastest kernels pays off (the
    # kernels it picks may differ between runs: bit-identical results are a CPU promise only).
    torch.backends.cudnn.benchmark = on_gpu
    accelerator = Accelerator(
        # Without cpu=True a multi-process launch on a machine with no GPU trains N unsynchronised copies.
        cpu=not on_gpu,
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        log_with=None if log_with == "none" else [log_with],
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "tensorboard")
        ),
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s)),
            ddp_kwargs(cfg.ddp),
        ],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UsageError(
            f"the launcher started {launched} processes but Accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}); refusing to train unsynchronised copies. On CPU use "
            "`accelerate launch --config_file launch/cpu_multi.yaml` or torchrun."
        )
    check_ddp_options(accelerator, cfg)
    return accelerator


def resolve_precision(requested: str, on_gpu: bool) -> str:
    """train.mixed_precision with `auto` decided: bf16 where the hardware runs it natively, else fp16 + loss
    scaling on a GPU (a T4 or V100 emulates bf16, slowly) and fp32 on a CPU (emulated bf16 there is ~10x slower)."""
    if requested != "auto":
        return requested
    if on_gpu:
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


# Accelerate looks its hooks up by enum member: a plain string registers no hook at all, silently.
COMM_HOOKS = {
    "none": DDPCommunicationHookType.NO,
    "fp16": DDPCommunicationHookType.FP16,
    "bf16": DDPCommunicationHookType.BF16,
    "powersgd": DDPCommunicationHookType.POWER_SGD,
    "batched_powersgd": DDPCommunicationHookType.BATCHED_POWER_SGD,
}


def ddp_kwargs(ddp: DDPConfig) -> DistributedDataParallelKwargs:
    """cfg.ddp as Accelerate's DDP handler: Accelerate passes it to DistributedDataParallel and registers the hook."""
    powersgd = ddp.comm_hook in ("powersgd", "batched_powersgd")
    return DistributedDataParallelKwargs(
        bucket_cap_mb=ddp.bucket_cap_mb,
        gradient_as_bucket_view=ddp.gradient_as_bucket_view,
        static_graph=ddp.static_graph,
        comm_hook=COMM_HOOKS[ddp.comm_hook],
        # epsilon: a gradient with an all-zero column (a unit that is off for the whole batch) would
        # otherwise turn PowerSGD's Gram-Schmidt into NaN (seen on the tiny test network)
        comm_state_option={
            "matrix_approximation_rank": ddp.powersgd_rank,
            "start_powerSGD_iter": ddp.powersgd_start_step,
            "orthogonalization_epsilon": 1e-8,
        }
        if powersgd
        else {},
    )


def check_ddp_options(accelerator: Accelerator, cfg: Config) -> None:
    """Refuse, on every rank alike and before any training, cfg.ddp options that this torch or backend cannot run.

    A comm hook runs once on a small gradient over the real process group: that asks the backend (gloo or
    NCCL, and its version) rather than a table of what it was once known to do."""
    from distcifar.config import ConfigError, DDPConfig

    ddp = cfg.ddp
    if accelerator.num_processes == 1:
        if ddp != DDPConfig():
            print_once(
                "note: the ddp.* options configure DDP, which one process does not use; they have no effect here"
            )
        return
    if ddp.static_graph and cfg.train.grad_accum_steps > 1:
        raise ConfigError(
            "ddp.static_graph needs DDP's first backward pass to synchronise gradients, and with train.grad_accum_steps "
            "> 1 it does not (torch's reducer then fails an internal assertion); set ddp.static_graph false or "
            "train.grad_accum_steps 1"
            if accelerator.is_main_process
            else ""
        )
    if ddp.comm_hook == "none":
        return
    try:
        _run_comm_hook_once(ddp, accelerator.device)
    except Exception as err:  # noqa: BLE001 - any failure of the hook is a refusal; the same on every rank
        alternative = {
            "fp16": "bf16 or none",
            "bf16": "fp16 or none",
            "powersgd": "fp16 or none",
            "batched_powersgd": "powersgd",
        }[ddp.comm_hook]
        first = (str(err).strip().splitlines() or [""])[0][:200]
        message = (
            f"ddp.comm_hook {ddp.comm_hook} does not run on the {dist.get_backend()} backend of torch "
            f"{torch.__version__} ({type(err).__name__}{': ' + first if first else ''}); "
            f"use ddp.comm_hook {alternative}"
        )
        raise ConfigError(message if accelerator.is_main_process else "") from None  # the main rank says why


class _Bucket:
    """The part of a dist.GradBucket that DDP's comm hooks read: one flattened 8x8 gradient."""

    def __init__(self, device: torch.device):
        self._buffer = torch.arange(64, dtype=torch.float32, device=device) / 64

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def gradients(self) -> list[torch.Tensor]:
        return [self._buffer.view(8, 8)]

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True


def _run_comm_hook_once(ddp: DDPConfig, device: torch.device) -> None:
    """Run the configured hook on one small bucket, past PowerSGD's warm-up (a collective of all ranks)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if ddp.comm_hook in ("fp16", "bf16"):
        hook = default_hooks.fp16_compress_hook if ddp.comm_hook == "fp16" else default_hooks.bf16_compress_hook
        hook(None, _Bucket(device)).wait()
        return
    state = powerSGD_hook.PowerSGDState(
        None, matrix_approximation_rank=1, start_powerSGD_iter=2, orthogonalization_epsilon=1e-8
    )
    state.iter = state.start_powerSGD_iter
    hook = powerSGD_hook.powerSGD_hook if ddp.comm_hook == "powersgd" else powerSGD_hook.batched_powerSGD_hook
    hook(state, _Bucket(device)).wait()


def leave(accelerator: Accelerator, exit_code: int = 0) -> None:
    """End the run on every rank together, then exit with `exit_code` (return when it is 0 and alone).

    With several processes the interpreter's own teardown is skipped once the atexit handlers have
    run: a rank tearing down torch.distributed's C++ state at interpreter exit was seen to abort now
    and then ("terminate called without an active exception", SIGABRT) after a run had finished."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        atexit._run_exitfuncs()  # the output lock, W&B
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    if exit_code:
        sys.exit(exit_code)


def hardware(accelerator: Accelerator) -> dict:
    """What the run is on, for the tracker's run config and the benchmark's report."""
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "cpu")
    return {
        "device": str(accelerator.device),
        "device_name": name,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "distributed_type": str(accelerator.distributed_type),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def agree(accelerator: Accelerator, *flags: float) -> list[float]:
    """The max of each flag over all ranks, so every rank takes the same decision (a host sync when there are
    several; one process has nothing to agree with, and its flags never go to the device and back)."""
    if accelerator.num_processes == 1:
        return [float(flag) for flag in flags]
    values = torch.tensor(flags, dtype=torch.float64, device=accelerator.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


class StopRequest:
    """Remembers a SIGTERM/SIGINT/SIGUSR1 so training can checkpoint at the next agreed step."""

    def __init__(self):
        self.signum = 0
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        # Ctrl-C under a launcher delivers SIGINT and then the launcher's SIGTERM: keep the first,
        # never raise, so the checkpoint is written; the launcher kills us if we take too long.
        self.signum = self.signum or signum


class OutputLock:
    """OUTPUT_DIR/.lock: one run per output folder, held by the main process of the run.

    The lock names its host, pid and Slurm job. A lock is stale, and is taken over, when its process
    is gone (same host), when it belongs to this very Slurm job (a requeue, maybe on another node),
    or when nobody has refreshed it for STALE_S seconds (another host: a heartbeat thread refreshes
    it every HEARTBEAT_S seconds while the run lives)."""

    HEARTBEAT_S, STALE_S = 30, 120

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / ".lock"
        self._stop = threading.Event()
        self._held = False

    def acquire(self, accelerator: Accelerator) -> None:
        """Collective: every rank raises UsageError if another live run holds the folder."""
        holder = None
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            holder = self._try_acquire()
        if agree(accelerator, holder is not None)[0]:
            raise UsageError(
                f"{self.path.parent} is in use by another run (host {holder['host']}, pid {holder['pid']}, started "
                f"{holder['started']}); use another --output_dir, or stop that run first"
                if holder
                else ""
            )

    def _try_acquire(self) -> dict | None:
        """None when the lock is ours now, else the live holder's record."""
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": psutil.Process().create_time(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is not None and self._alive(holder):
                    return holder
                self.path.unlink(missing_ok=True)  # stale: a killed run, or this job before its requeue
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            threading.Thread(target=self._heartbeat, daemon=True).start()
            atexit.register(self.release)  # also after an error or a stop signal; a SIGKILL leaves a stale lock
            return None
        return self._read() or {"host": "?", "pid": "?", "started": "?"}

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _alive(self, holder: dict) -> bool:
        if holder.get("slurm_job_id") and holder["slurm_job_id"] == os.environ.get("SLURM_JOB_ID"):
            return False
        if holder.get("host") == socket.gethostname():
            try:
                process = psutil.Process(holder["pid"])
                return (
                    abs(process.create_time() - holder["pid_started"]) < 1 and process.status() != psutil.STATUS_ZOMBIE
                )  # killed, not yet reaped
            except (psutil.Error, KeyError, TypeError):
                return False
        try:
            return time.time() - self.path.stat().st_mtime < self.STALE_S
        except OSError:
            return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._held:
            self._stop.set()
            self.path.unlink(missing_ok=True)
            self._held = False
