"""The same few training steps under each set of ddp.* options, under a real launcher, in one launch:

    <launcher> tests/probes/ddp_options.py --out FILE --steps K --options JSON [train.py ARGS ...]

The real Accelerator (accelerator.build_accelerator, its refusals included), engine.build_training and
engine.train_step on the real TrainBatches, in the process group of however many processes the launcher started.
Besides the losses it records what DDP was given (its own attributes and comm-hook state), whether the gradients
are views of DDP's buckets, and, at one step (--check_step), the gradient the optimizer receives against the exact
mean of the ranks' gradients computed a second way: each rank's own backward without DDP, summed with a plain
all-reduce.
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
    parser.add_argument("--check_step", type=int, default=2, help="the step (0-based) whose gradient is compared")
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
        losses, spreads, gradient = [], [], {}
        for step in range(args.steps):
            if step == args.check_step and accelerator.num_processes > 1:
                loss, gradient = _received_against_exact(accelerator, parts, cfg, step)
            else:
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
            **_what_ddp_was_given(parts.model),
            **gradient,
        }
        accelerator.free_memory()
    if accelerator is not None and accelerator.is_main_process:
        Path(args.out).write_text(json.dumps(results))
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()


def _what_ddp_was_given(model) -> dict:
    """The options as the DDP module holds them (one process has no DDP: nothing)."""
    if not hasattr(model, "reducer"):
        return {}
    hook_state = model._comm_hooks[0][1] if model._comm_hooks else None
    return {
        "gradient_as_bucket_view": model.gradient_as_bucket_view,
        "static_graph": model.static_graph,
        "bucket_bytes_cap": model.bucket_bytes_cap,
        "powersgd_rank": getattr(hook_state, "matrix_approximation_rank", None),
    }


def _received_against_exact(accelerator, parts, cfg, step: int):
    """Take optimizer step `step` through engine.train_step as usual, but first compute the exact mean gradient a
    second way (each rank's backward on its micro-batches without DDP, from the same RNG state, then a plain sum
    over ranks / world size), and capture the gradient the optimizer receives. Returns train_step's loss and, of
    what was received: its relative error, its scale (<received, exact> / |exact|^2), its projection ratio
    (<received, exact> / |received|^2: 1 for PowerSGD's first compressed step, an orthogonal projection of the exact
    gradient), and how many distinct storages hold the gradients (one per bucket when they are bucket views)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from distcifar.engine import train_step

    module = parts.model.module
    params = list(module.parameters())
    buffers = {name: value.clone() for name, value in module.named_buffers()}
    exact = [torch.zeros_like(p) for p in params]
    with torch.random.fork_rng():  # the step below draws the same dropout masks
        for images, labels in parts.batches.at_step(step):
            with accelerator.autocast():
                loss = F.cross_entropy(module(images), labels, label_smoothing=cfg.optim.label_smoothing)
            for total, grad in zip(exact, torch.autograd.grad(loss / cfg.train.grad_accum_steps, params)):
                total += grad
    with torch.no_grad():  # BatchNorm's running statistics as they were
        for name, value in module.named_buffers():
            value.copy_(buffers[name])
    flat_exact = torch.cat([g.flatten() for g in exact]).double()
    dist.all_reduce(flat_exact)
    flat_exact /= accelerator.num_processes

    received = {}

    def capture(optimizer, args, kwargs):
        received["flat"] = torch.cat([p.grad.detach().flatten() for p in params]).double()
        received["storages"] = len({p.grad.untyped_storage().data_ptr() for p in params})

    handle = parts.optimizer.optimizer.register_step_pre_hook(capture)
    loss, _ = train_step(accelerator, parts.model, parts.optimizer, parts.batches.at_step(step), cfg.optim, False)
    handle.remove()
    flat = received["flat"]
    dot = float(flat @ flat_exact)
    return loss, {
        "check_step": step,
        "gradient_relative_error": float((flat - flat_exact).norm() / flat_exact.norm()),
        "gradient_scale": dot / float(flat_exact @ flat_exact),
        "gradient_projection_ratio": dot / float(flat @ flat),
        "gradient_storages": received["storages"],
        "parameters": len(params),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
