"""Resuming with node-local disks, under a real launcher:

    <launcher> tests/probes/resume_per_rank.py --root DIR --steps S ... [--rank1_steps S ...] [--resume auto|FOLDER]
        [--collective_timeout_s T]

Each rank has its own folder DIR/rank<R> (its checkpoint root and working directory) and resumes with the real
Checkpointer.resume; a refusal ends the job as train.py ends it (one error line, exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support (which adds the repository)
from support import TINY_MODEL_CONFIG, probe_accelerator  # noqa: E402


def resume(args: argparse.Namespace) -> None:
    """Checkpoints written by the real Checkpointer.save (one optimizer step of a tiny network apart) into
    every rank's folder DIR/rank<R>, rank 1's holding only --rank1_steps; then each rank chdirs into its own
    folder and calls Checkpointer.resume(--resume) with its folder as the root. The main process prints
    `RESUMED {"steps": [...], "checksums": [...]}`: each rank's resumed step and sum of its weights."""
    import torch

    from distcifar.checkpoint import Checkpointer
    from distcifar.config import Config
    from distcifar.model import DistCifarNet
    from distcifar.optim import build_optimizer, build_scheduler

    root = Path(args.root)
    accelerator = probe_accelerator(str(root / "run"), args.collective_timeout_s)
    cfg = Config(model=TINY_MODEL_CONFIG)
    torch.manual_seed(0)
    model = DistCifarNet(cfg.model).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=4, total_steps=16)
    model, optimizer = accelerator.prepare(model, optimizer)

    def checkpoints(rank: int) -> Checkpointer:
        return Checkpointer(
            accelerator,
            root / f"rank{rank}",
            cfg.checkpoint,
            cfg.to_dict(),
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
        )

    held = {
        rank: args.rank1_steps if rank == 1 and args.rank1_steps else args.steps
        for rank in range(accelerator.num_processes)
    }
    for step in sorted(set(args.steps) | set(args.rank1_steps or [])):
        accelerator.backward(model(torch.randn(4, 3, 32, 32)).sum())
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        for rank, steps in held.items():  # collective: the main process writes into every rank's folder
            if step in steps:
                checkpoints(rank).save(step, {"step": step})

    rank = accelerator.process_index
    os.chdir(root / f"rank{rank}")
    if accelerator.is_main_process:
        print(f"resume_per_rank: resuming (unix time {time.time():.3f})", flush=True)
    state = checkpoints(rank).resume(args.resume)
    checksum = sum(p.detach().double().sum() for p in model.parameters())
    steps = accelerator.gather(torch.tensor([state.get("step", 0)], device=accelerator.device))
    checksums = accelerator.gather(checksum[None])
    if accelerator.is_main_process:
        print("RESUMED " + json.dumps({"steps": steps.tolist(), "checksums": checksums.tolist()}), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main() -> None:
    p = argparse.ArgumentParser(prog="resume_per_rank.py")
    p.add_argument("--root", required=True)
    p.add_argument("--steps", type=int, nargs="+", required=True, help="checkpoints in every rank's folder")
    p.add_argument("--rank1_steps", type=int, nargs="+", default=None, help="rank 1's folder holds only these")
    p.add_argument("--resume", default="auto", help="auto, or a folder (relative: in each rank's own folder)")
    p.add_argument("--collective_timeout_s", type=int, default=30)
    args = p.parse_args()
    from distcifar.errors import entry_point

    entry_point(resume)(args)  # a refusal as train.py gives it: one error line, exit code 2


if __name__ == "__main__":
    main()
