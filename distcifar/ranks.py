"""What the processes of a run do together: print once, agree on a decision, fail together, end together."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import broadcast_object_list

from distcifar.errors import exit_process


def print_once(*args) -> None:
    """Print on the main process only (accelerator.print prints once per node)."""
    if PartialState().is_main_process:
        print(*args, flush=True)


T = TypeVar("T")


def decided_by_main_process(accelerator: Accelerator, decide: Callable[[], T]) -> T:
    """`decide()` run by the main process alone, its answer handed to every rank (one broadcast with several)."""
    answer = [decide() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer)
    return answer[0]


def max_over_ranks(accelerator: Accelerator, *flags: float) -> list[float]:
    """The max of each flag over all ranks, so every rank takes the same decision (a host sync when there are
    several; one process has nothing to agree with, and its flags never go to the device and back)."""
    if accelerator.num_processes == 1:
        return [float(flag) for flag in flags]
    values = torch.tensor(flags, dtype=torch.float64, device=accelerator.device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values.tolist()


def fail_together(
    accelerator: Accelerator, error: type[Exception], message: str | None, *, same_on_every_rank: bool = False
) -> None:
    """Raise `error` on every rank when any rank has a `message` (None: nothing failed on this rank).

    Only the main process's message is kept: entry_point prints it once, and the other ranks raise the same
    error with an empty message, so they exit with the same code in silence. Collective (one all-reduce) unless
    `same_on_every_rank` says every rank reached the same verdict by itself."""
    failed = message is not None
    if not same_on_every_rank:
        failed = bool(max_over_ranks(accelerator, failed)[0])
    if failed:
        raise error((message or "") if accelerator.is_main_process else "")


def rank_weight_spread(accelerator: Accelerator, model: torch.nn.Module) -> float:
    """max - min over ranks of the sum of every weight: 0.0 while DDP keeps the ranks identical (one gather)."""
    checksum = sum(p.detach().double().sum() for p in model.parameters())
    sums = accelerator.gather(checksum[None])
    return (sums.max() - sums.min()).item()


def take_main_process_buffers(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """Every rank takes the main process's buffers of `module` (BatchNorm statistics), in place. Collective with
    several processes; nothing to do with one."""
    if accelerator.num_processes > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def end_run(accelerator: Accelerator, exit_code: int = 0) -> None:
    """End the run on every rank together, then exit with `exit_code` (return when it is 0 and alone;
    several processes skip the interpreter's teardown: distcifar.errors.exit_process says why)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    exit_process(exit_code)
