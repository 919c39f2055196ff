"""How DDP communicates gradients: cfg.ddp as Accelerate's DDP handler, and a refusal, before any training, of the
options this torch or backend cannot run."""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

from distcifar.config import Config, DDPConfig
from distcifar.errors import ConfigError
from distcifar.ranks import fail_together, print_once

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
    ddp = cfg.ddp
    if accelerator.num_processes == 1:
        if ddp != DDPConfig():
            print_once(
                "note: the ddp.* options configure DDP, which one process does not use; they have no effect here"
            )
        return
    if ddp.static_graph and cfg.train.grad_accum_steps > 1:
        fail_together(
            accelerator,
            ConfigError,
            "ddp.static_graph needs DDP's first backward pass to synchronise gradients, and with "
            "train.grad_accum_steps > 1 it does not (torch's reducer then fails an internal assertion); set "
            "ddp.static_graph false or train.grad_accum_steps 1",
            same_on_every_rank=True,
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
        fail_together(accelerator, ConfigError, message, same_on_every_rank=True)


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
