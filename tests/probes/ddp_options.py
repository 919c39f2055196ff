"""The same few training steps under each set of ddp.* options, under a real launcher, in one launch:

    <launcher> tests/probes/ddp_options.py --out FILE --steps K --options JSON [train.py ARGS ...]

The real Accelerator (runtime.build_accelerator, its refusals included), engine.build and engine.train_step on
the real TrainBatches, in the process group of however many processes the launcher started.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support (which adds the repository)
import support  # noqa: E402, F401  (for the repository on sys.path)


def main(argv: list[str]) -> None:
    """For each named set of ddp.* options: accelerator.build_accelerator (its refusals included), then
    engine.build_training and engine.train_step for --steps optimizer steps on the real TrainBatches, from the
    same seed. Per step: the mean loss over ranks and the spread of every rank's weight checksum; at
    the end whether every rank holds bit-identical weights and buffers. A refused option records its
    message instead. The main process writes {name: result} to --out."""
    import torch
    from accelerate.utils import set_seed

    from distcifar.accelerator import build_accelerator
    from distcifar.config import parse_config
    from distcifar.data import load_splits
    from distcifar.engine import build_training, train_step
    from distcifar.errors import ConfigError

    parser = argparse.ArgumentParser(prog="ddp_options.py")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--options", required=True, help='JSON: {"name": ["--ddp.comm_hook", "fp16", ...], ...}')
    args, config_args = parser.parse_known_args(argv)
    results, accelerator = {}, None
    for name, options in json.loads(args.options).items():
        cfg, _ = parse_config(config_args + options, prog="ddp_options.py", description="")
        try:
            accelerator = build_accelerator(cfg)
        except ConfigError as err:
            results[name] = {"refused": str(err)}
            continue
        set_seed(cfg.train.seed)
        with accelerator.main_process_first():
            train_split, eval_split, _ = load_splits(cfg.data, cfg.model.num_classes)
        parts = build_training(cfg, accelerator, train_split, eval_split)
        torch.manual_seed(cfg.train.seed * 1000 + accelerator.process_index)  # as train.py: each rank its dropout
        losses, spreads = [], []
        for step in range(args.steps):
            loss, _ = train_step(
                accelerator, parts.model, parts.optimizer, parts.batches.at_step(step), cfg.optim, False
            )
            parts.scheduler.step()
            losses.append(accelerator.reduce(loss.detach(), "mean").item())
            checksum = sum(p.detach().double().sum() for p in parts.model.parameters())
            sums = accelerator.gather(checksum[None])
            spreads.append((sums.max() - sums.min()).item())
        # weights only: BatchNorm buffers follow each rank's data until DDP's next forward broadcasts rank 0's
        flat = torch.cat([p.detach().double().flatten() for p in parts.model.parameters()])
        every_rank = accelerator.gather(flat[None])
        identical = all(torch.equal(every_rank[0], every_rank[r]) for r in range(len(every_rank)))
        results[name] = {
            "losses": losses,
            "rank_weight_max_diff": spreads,
            "identical_final_weights": identical,
            "num_processes": accelerator.num_processes,
            "comm_hooks": len(parts.model._comm_hooks),
        }
        accelerator.free_memory()
    if accelerator is not None and accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(results))
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1:])
