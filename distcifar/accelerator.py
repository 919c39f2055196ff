"""The one Accelerator of a run, built after refusing launches that would train unsynchronised copies."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, parse_flag_from_env

from distcifar import elastic
from distcifar.config import Config
from distcifar.ddp import check_ddp_options, ddp_kwargs
from distcifar.errors import UsageError
from distcifar.hardware import cpu_threads, resolve_precision


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
    set_determinism(cfg.train.deterministic, on_gpu)
    if not on_gpu:
        torch.set_num_threads(cpu_threads()[0])
    collective_timeout = timedelta(seconds=cfg.train.collective_timeout_s)
    # Under torch elastic the process group is built here, on a store of this attempt's own (a restarted group
    # must not read the dead one's keys); Accelerate then finds it initialised. On CPU with MPI available,
    # Accelerate would pick MPI, which needs no store. A second Accelerator in one process (the DDP-options probe)
    # finds the group already there.
    initialised = torch.distributed.is_initialized()
    if elastic.under_elastic_agent() and not initialised and (on_gpu or not torch.distributed.is_mpi_available()):
        elastic.init_process_group("nccl" if on_gpu else "gloo", collective_timeout)
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
            InitProcessGroupKwargs(timeout=collective_timeout),
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


# cuBLAS picks its reduction order by workspace unless it has a fixed one: the setting PyTorch's reproducibility notes
# give for torch.use_deterministic_algorithms on CUDA 10.2 and later (a GPU run without it stops with an error).
CUBLAS_WORKSPACE = ":4096:8"


def set_determinism(deterministic: bool, on_gpu: bool) -> None:
    """train.deterministic, set both ways (the process may have set it before).

    Off: every batch has the same shape, so on a GPU cuDNN's one-time search for the fastest kernels pays off; the
    kernels it picks, and some atomics-based ones, may differ from run to run. On: no search, deterministic kernels
    only (an operation that has none raises an error naming itself), and the fixed cuBLAS workspace they need, set
    before the first cuBLAS call. A CPU's kernels are deterministic either way."""
    torch.backends.cudnn.benchmark = on_gpu and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def determinism_line(deterministic: bool, device: torch.device) -> str:
    """What train.deterministic is and what it means on this device, for the run's header."""
    if device.type != "cuda":
        return f"deterministic {'on' if deterministic else 'off'} (a CPU run is bit-identical either way)"
    if deterministic:
        return "deterministic on: no cuDNN kernel search, deterministic kernels only: bit-identical, at a cost in speed"
    return "deterministic off (cuDNN's kernel search on: fastest, not bit-identical from run to run)"
