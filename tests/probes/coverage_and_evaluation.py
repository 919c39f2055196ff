"""What each rank trains and evaluates on, under a real launcher, in one launch:

    <launcher> tests/probes/coverage_and_evaluation.py --out FILE [--train N --batch_size B --accum A ...]
        [--epochs E --seed S] [--run TRAIN_OUTPUT_DIR --eval_batch_size B ...]

Sample coverage: every rank walks whole epochs of the real TrainBatches with its real rank and world size.
Evaluation counting (with --run): engine.evaluate() on a finished run's final weights, for each eval batch size.
The Accelerator is the one train.py would build (runtime.build_accelerator); the process group is that of
however many processes the launcher started. The main process writes a JSON report to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support (which adds the repository)
from support import probe_accelerator  # noqa: E402


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
    common = dict(batch_size=batch_size, seed=seed, device=device, layout=torch.channels_last)
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
    from distcifar.engine import evaluate
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
        result = evaluate(accelerator, prepared, loader, num_classes=k, layout=torch.channels_last)
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="coverage_and_evaluation.py")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=250, help="coverage: training set size")
    p.add_argument("--batch_size", type=int, default=48, help="coverage: global batch")
    p.add_argument("--accum", type=int, nargs="+", default=[1, 2], help="coverage: accumulation steps to try")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run", default=None, help="evaluation: a finished train.py output folder")
    p.add_argument("--eval_batch_size", type=int, nargs="+", default=[16])
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    accelerator = probe_accelerator(str(out.parent / "check_run"))
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


if __name__ == "__main__":
    main()
