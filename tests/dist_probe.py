"""Helpers that tests/test_distributed.py runs under real launchers (accelerate launch, torchrun).

    python tests/dist_probe.py make-data DIR [--train N] [--test N]
    <launcher> tests/dist_probe.py train [train.py ARGS ...]
    <launcher> tests/dist_probe.py check --out FILE [--run TRAIN_OUTPUT_DIR --eval_batch_size B ...]
    <launcher> tests/dist_probe.py whoami
    <launcher> tests/dist_probe.py ddp --out FILE --steps K --options JSON [train.py ARGS ...]
    <launcher> tests/dist_probe.py resume --root DIR --steps S ... [--rank1_steps S ...] [--resume auto|FOLDER]

Nothing here replaces a piece of the distributed machinery: every mode builds the real
Accelerator (through runtime.build_accelerator, so with train.py's own checks), the real
TrainBatches and the real process group of however many processes the launcher started.

`train` runs distcifar.train.main() unchanged, with optional instruments set by environment (the
step generator it drives, engine.optimizer_steps, is wrapped, not replaced):
  PROBE_DUMP_DIR=DIR               each rank saves its final model state (weights and buffers) to
                                   DIR/rank<R>.safetensors when train.py calls end_training()
  PROBE_FAIL_RANK=R PROBE_FAIL_STEP=S
                                   rank R raises RuntimeError after its S-th optimizer step (1-based):
                                   a crash on one rank only
  PROBE_HANG=1 (with PROBE_FAIL_RANK/STEP)
                                   instead of raising, that rank stops answering (sleeps, SIGTERM
                                   included) at that step: a stuck rank rather than a crashed one

`resume` emulates node-local disks: each rank has its own folder DIR/rank<R> (its checkpoint root
and working directory) and resumes with the real Checkpointer.resume.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAIL_MESSAGE = "dist_probe: injected failure on rank {rank} at step {step} (unix time {time:.3f})"


# ---------------------------------------------------------------------------------------------
# train: distcifar.train.main() with instruments


def cmd_train(argv: list[str]) -> None:
    from accelerate import Accelerator

    import distcifar.train as train

    dump_dir = os.environ.get("PROBE_DUMP_DIR")
    fail_rank = os.environ.get("PROBE_FAIL_RANK")
    if dump_dir:
        end_training = Accelerator.end_training

        def dump_then_end_training(self):
            from safetensors.torch import save_file

            model = self.unwrap_model(self._models[0])
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            save_file(state, str(Path(dump_dir) / f"rank{self.process_index}.safetensors"))
            return end_training(self)

        Accelerator.end_training = dump_then_end_training
    if fail_rank is not None:
        fail_rank, fail_step = int(fail_rank), int(os.environ.get("PROBE_FAIL_STEP", "1"))
        optimizer_steps = train.optimizer_steps

        def failing_optimizer_steps(accelerator, *args, **kwargs):
            for count, report in enumerate(optimizer_steps(accelerator, *args, **kwargs), start=1):
                if accelerator.process_index == fail_rank and count == fail_step:
                    if os.environ.get("PROBE_HANG"):
                        print(
                            f"dist_probe: rank {fail_rank} stops answering at step {fail_step} "
                            f"(unix time {time.time():.3f})",
                            file=sys.stderr,
                            flush=True,
                        )
                        while True:
                            time.sleep(60)
                    raise RuntimeError(FAIL_MESSAGE.format(rank=fail_rank, step=fail_step, time=time.time()))
                yield report

        train.optimizer_steps = failing_optimizer_steps
    train.main(argv)


# ---------------------------------------------------------------------------------------------
# check: sample coverage and evaluation counting, in one launch


def _accelerator(output_dir: str, timeout_s: int = 120):
    """The Accelerator train.py would build (its own WORLD_SIZE check included)."""
    from distcifar.config import Config
    from distcifar.runtime import build_accelerator

    cfg = Config()
    cfg.output_dir = output_dir
    cfg.tracking.report_to = "none"
    cfg.train.mixed_precision = "no"
    cfg.train.collective_timeout_s = timeout_s
    return build_accelerator(cfg)


def coverage(accelerator, n: int, batch_size: int, accums: list[int], epochs: int, seed: int) -> dict:
    """Every rank walks whole epochs of the real TrainBatches with its real rank and world size.

    The training set's labels are the sample indices (0..N-1) and its images random, so what a
    rank trains on is read from the batches it is given, not from bookkeeping. All ranks'
    indices and augmented images are gathered; the main process returns them with the epoch's
    permutation and a 1-process TrainBatches' view of the same steps, for the test to compare."""
    import torch

    from distcifar.config import DataConfig
    from distcifar.data import Split, TrainBatches

    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    generator = torch.Generator().manual_seed(7)
    split = Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator), torch.arange(n))
    data_cfg = DataConfig()  # default augmentation: crop + hflip
    common = dict(batch_size=batch_size, seed=seed, device=device, channels_last=True)
    reference = TrainBatches(split, data_cfg, grad_accum_steps=1, rank=0, world_size=1, **common)
    report = {"n": n, "batch_size": batch_size, "runs": []}
    for accum in accums:
        batches = TrainBatches(split, data_cfg, grad_accum_steps=accum, rank=rank, world_size=world, **common)
        for epoch in range(epochs):
            # [step, micro, micro_batch] indices and the matching augmented images, from the real iterator
            indices, images = [], []
            for _, micro_batches in batches.epoch(epoch):
                pairs = list(micro_batches)
                indices.append(torch.stack([y for _, y in pairs]))
                images.append(torch.stack([x.float().contiguous() for x, _ in pairs]))
            indices, images = torch.stack(indices), torch.stack(images)
            # resuming in the middle of the epoch gives the same micro-batches
            start = batches.steps_per_epoch // 2
            resumed = torch.stack([torch.stack([y for _, y in mb]) for _, mb in batches.epoch(epoch, start_step=start)])
            # rank_indices() (what the iterator uses) agrees with what was yielded
            order = batches.permutation(epoch)
            by_rank_indices = torch.stack(
                [
                    torch.stack([batches.rank_indices(order, s, m)[1] for m in range(accum)])
                    for s in range(batches.steps_per_epoch)
                ]
            )
            flags = torch.tensor(
                [[int(torch.equal(resumed, indices[start:])), int(torch.equal(by_rank_indices, indices))]],
                device=device,
            )
            all_indices = accelerator.gather(indices[None])  # [world, steps, accum, micro]
            all_images = accelerator.gather(images[None])
            all_flags = accelerator.gather(flags)
            if not accelerator.is_main_process:
                continue
            # the same steps of a 1-process run: sample index -> augmented image
            one_process_indices, same_images = [], []
            for step, micro_batches in reference.epoch(epoch):
                ((x1, y1),) = list(micro_batches)
                one_process_indices.append(y1.tolist())
                one_process = {int(i): img for i, img in zip(y1.tolist(), x1.float())}
                ok = True
                for r in range(world):
                    for m in range(accum):
                        for i, img in zip(all_indices[r, step, m].tolist(), all_images[r, step, m]):
                            ok = ok and i in one_process and torch.equal(one_process[i], img)
                same_images.append(ok)
            report["runs"].append(
                {
                    "accum": accum,
                    "epoch": epoch,
                    "steps_per_epoch": batches.steps_per_epoch,
                    "micro_batch": batches.micro_batch,
                    "permutation": order.tolist(),
                    "indices": all_indices.tolist(),  # [rank][step][micro][i]
                    "one_process_indices": one_process_indices,  # [step][i]
                    "same_augmented_images_as_one_process": same_images,
                    "resume_ok": all_flags[:, 0].tolist(),
                    "rank_indices_ok": all_flags[:, 1].tolist(),
                }
            )
    return report


def evaluation(accelerator, run: Path, batch_sizes: list[int]) -> dict:
    """engine.evaluate() on the final weights of a finished run (RUN/final, RUN/config.json), once per
    eval batch size, with the loader prepared as train.py prepares it; and on the main process a
    plain 1-process reference (no Accelerate, no gather) over the same images and weights."""
    import torch

    from distcifar.config import config_from_dict
    from distcifar.data import load_splits, normalize
    from distcifar.engine import Parts, evaluate
    from distcifar.model import DistCifarNet

    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    with accelerator.main_process_first():
        _, eval_split, _ = load_splits(cfg.data, cfg.model.num_classes)
    model = DistCifarNet.from_pretrained(str(run / "final")).to(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [model(normalize(x).contiguous(memory_format=torch.channels_last)) for x in eval_split.images.split(25)]
        )
    k = cfg.model.num_classes
    reference = torch.bincount(eval_split.labels * k + logits.argmax(1), minlength=k * k).view(k, k)
    prepared = accelerator.prepare(model)
    results = {}
    for batch_size in batch_sizes:
        dataset = torch.utils.data.TensorDataset(eval_split.images, eval_split.labels)
        loader = accelerator.prepare(torch.utils.data.DataLoader(dataset, batch_size=batch_size))
        result = evaluate(accelerator, Parts(prepared, loader, torch.channels_last), k)
        results[str(batch_size)] = {
            key: result[key] for key in ("eval_accuracy", "eval_loss", "eval_samples", "confusion")
        }
    return {
        "eval_images": len(eval_split),
        "results": results,
        "reference": {
            "confusion": reference.tolist(),
            "eval_accuracy": reference.diag().sum().item() / len(eval_split),
            "eval_loss": torch.nn.functional.cross_entropy(logits, eval_split.labels).item(),
            "predicted_classes": sorted(set(logits.argmax(1).tolist())),
        },
    }


def cmd_check(args) -> None:
    out = Path(args.out)
    accelerator = _accelerator(str(out.parent / "check_run"))
    report = {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "launched_world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    report["coverage"] = coverage(accelerator, args.train, args.batch_size, args.accum, args.epochs, args.seed)
    if args.run:
        report["evaluation"] = evaluation(accelerator, Path(args.run), args.eval_batch_size)
    if accelerator.is_main_process:
        out.write_text(json.dumps(report))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def cmd_whoami(args) -> None:
    """One line per process: what the launcher set and what runtime.build_accelerator made of it."""
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    accelerator = _accelerator("whoami_run")
    print(
        "WHOAMI "
        + json.dumps(
            {
                "pid": os.getpid(),
                "env": env,
                "num_processes": accelerator.num_processes,
                "process_index": accelerator.process_index,
                "distributed_type": str(accelerator.distributed_type),
            }
        ),
        flush=True,
    )
    accelerator.end_training()


def cmd_resume(args) -> None:
    """Checkpoints written by the real Checkpointer.save (one optimizer step of a tiny network apart) into
    every rank's folder DIR/rank<R>, rank 1's holding only --rank1_steps; then each rank chdirs into its own
    folder and calls Checkpointer.resume(--resume) with its folder as the root. The main process prints
    `RESUMED {"steps": [...], "checksums": [...]}`: each rank's resumed step and sum of its weights."""
    import torch

    from distcifar.checkpoint import Checkpointer
    from distcifar.config import Config
    from distcifar.engine import RunState
    from distcifar.model import DistCifarNet
    from distcifar.optim import build_optimizer, build_scheduler
    from support import TINY_MODEL_CONFIG

    root = Path(args.root)
    accelerator = _accelerator(str(root / "run"), args.collective_timeout_s)
    cfg = Config(model=TINY_MODEL_CONFIG)
    torch.manual_seed(0)
    model = DistCifarNet(cfg.model).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=4, total_steps=16)
    model, optimizer = accelerator.prepare(model, optimizer)

    def checkpoints(rank: int) -> Checkpointer:
        return Checkpointer(accelerator, root / f"rank{rank}", cfg.checkpoint, cfg.to_dict())

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
                checkpoints(rank).save(RunState(step=step), model=model, optimizer=optimizer, scheduler=scheduler)

    rank = accelerator.process_index
    os.chdir(root / f"rank{rank}")
    if accelerator.is_main_process:
        print(f"dist_probe: resuming (unix time {time.time():.3f})", flush=True)
    state = checkpoints(rank).resume(args.resume, model=model, optimizer=optimizer, scheduler=scheduler)
    checksum = sum(p.detach().double().sum() for p in model.parameters())
    steps = accelerator.gather(torch.tensor([state.step], device=accelerator.device))
    checksums = accelerator.gather(checksum[None])
    if accelerator.is_main_process:
        print("RESUMED " + json.dumps({"steps": steps.tolist(), "checksums": checksums.tolist()}), flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        return cmd_train(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "ddp":
        return cmd_ddp(sys.argv[2:])
    parser = argparse.ArgumentParser(prog="dist_probe.py")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("make-data")
    p.add_argument("path")
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--test", type=int, default=101)
    p = sub.add_parser("check")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=250, help="coverage: training set size")
    p.add_argument("--batch_size", type=int, default=48, help="coverage: global batch")
    p.add_argument("--accum", type=int, nargs="+", default=[1, 2], help="coverage: accumulation steps to try")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", default=None, help="evaluation: a finished train.py output folder")
    p.add_argument("--eval_batch_size", type=int, nargs="+", default=[16])
    sub.add_parser("whoami")
    p = sub.add_parser("resume")
    p.add_argument("--root", required=True)
    p.add_argument("--steps", type=int, nargs="+", required=True, help="checkpoints in every rank's folder")
    p.add_argument("--rank1_steps", type=int, nargs="+", default=None, help="rank 1's folder holds only these")
    p.add_argument("--resume", default="auto", help="auto, or a folder (relative: in each rank's own folder)")
    p.add_argument("--collective_timeout_s", type=int, default=30)
    args = parser.parse_args()
    if args.mode == "make-data":  # the synthetic dataset the tests use, for runs by hand
        from support import write_parquet_dataset

        write_parquet_dataset(Path(args.path), args.train, args.test)
    elif args.mode == "check":
        cmd_check(args)
    elif args.mode == "resume":
        from distcifar.cli import entry_point

        entry_point(cmd_resume)(args)  # a refusal as train.py gives it: one error line, exit code 2
    else:
        cmd_whoami(args)


# ---------------------------------------------------------------------------------------------
# ddp: the same few training steps under each set of ddp.* options, in one launch


def cmd_ddp(argv: list[str]) -> None:
    """For each named set of ddp.* options: runtime.build_accelerator (its refusals included), then
    engine.build and engine.train_step for --steps optimizer steps on the real TrainBatches, from the
    same seed. Per step: the mean loss over ranks and the spread of every rank's weight checksum; at
    the end whether every rank holds bit-identical weights and buffers. A refused option records its
    message instead. The main process writes {name: result} to --out."""
    import torch
    from accelerate.utils import set_seed

    from distcifar.config import ConfigError, parse_config
    from distcifar.data import load_splits
    from distcifar.engine import build, train_step
    from distcifar.runtime import build_accelerator

    parser = argparse.ArgumentParser(prog="dist_probe.py ddp")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--options", required=True, help='JSON: {"name": ["--ddp.comm_hook", "fp16", ...], ...}')
    args, config_args = parser.parse_known_args(argv)
    results, accelerator = {}, None
    for name, options in json.loads(args.options).items():
        cfg, _ = parse_config(config_args + options, prog="dist_probe.py ddp", description="")
        try:
            accelerator = build_accelerator(cfg)
        except ConfigError as err:
            results[name] = {"refused": str(err)}
            continue
        set_seed(cfg.train.seed)
        with accelerator.main_process_first():
            train_split, eval_split, _ = load_splits(cfg.data, cfg.model.num_classes)
        parts = build(cfg, accelerator, eval_split, train_split)
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
    main()
