"""Evaluate a checkpoint or an export on the test split, every image counted once on any number of processes.

    accelerate launch distcifar/evaluate.py --checkpoint runs/x/checkpoints/step_00000480 [--output eval.json]
    python distcifar/evaluate.py --checkpoint runs/x/final --data.path ../shared/data/cifar10

Prints accuracy, loss, per-class accuracy and the confusion matrix as a table, and as JSON to --output.
Other options are config overrides (--data.path, --data.eval_limit, --train.eval_batch_size ...).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors.torch import load

from distcifar.checkpoint import CheckpointError, read_verified
from distcifar.config import ConfigError, ModelConfig, load_config
from distcifar.data import CLASSES, DataError, load_splits
from distcifar.model import DistCifarNet
from distcifar.train import build_accelerator, evaluate, usage_error


def load_model(path: Path) -> DistCifarNet:
    """A DistCifarNet from a training checkpoint (step_* folder) or an export (final/)."""
    if (path / "manifest.json").exists():
        _, blobs = read_verified(path)
        model = DistCifarNet(ModelConfig(**json.loads(blobs["state.json"])["config"]["model"]))
        model.load_state_dict(load(blobs["model.safetensors"]))
        return model
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        return DistCifarNet.from_pretrained(path)
    raise CheckpointError(f"{path}: neither a checkpoint (manifest.json) nor an export (model.safetensors + config.json)")


def format_table(result: dict) -> str:
    names = CLASSES[: len(result["per_class_accuracy"])]
    lines = [
        f"{result['eval_split']}: accuracy {result['eval_accuracy']:.4f}  loss {result['eval_loss']:.4f}  "
        f"({result['eval_samples']} images)",
        "",
        f"{'class':<12}{'accuracy':>9}   confusion (rows: true, columns: predicted)",
    ]
    for name, acc, row in zip(names, result["per_class_accuracy"], result["confusion"]):
        lines.append(f"{name:<12}{acc:>9.4f}   " + " ".join(f"{n:>5}" for n in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = {}
    for flag in ("--checkpoint", "--output"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                usage_error(f"{flag} needs a value")
            options[flag] = argv.pop(i + 1)
            argv.pop(i)
    if "--checkpoint" not in options:
        usage_error("give --checkpoint PATH (a checkpoints/step_* folder or an export such as OUTPUT_DIR/final)")
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        usage_error(str(err))
    path = Path(options["--checkpoint"])
    if not path.is_dir():
        usage_error(f"--checkpoint {path}: no such folder")
    try:
        model = load_model(path)
    except CheckpointError as err:
        usage_error(str(err))
    cfg.model = model.config
    cfg.tracking.report_to = "none"
    accelerator = build_accelerator(cfg)
    try:
        with accelerator.main_process_first():
            _, eval_split, eval_name = load_splits(cfg.data, cfg.model.num_classes)
    except DataError as err:
        usage_error(str(err))
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(eval_split.images, eval_split.labels), batch_size=cfg.train.eval_batch_size
    )
    model, loader = accelerator.prepare(model.to(memory_format=memory_format), loader)
    result = evaluate(model, loader, accelerator, cfg.model.num_classes, memory_format)
    result.update(eval_split=eval_name, checkpoint=str(path), num_processes=accelerator.num_processes)
    if accelerator.is_main_process:
        print(format_table(result))
        if "--output" in options:
            Path(options["--output"]).write_text(json.dumps(result, indent=2))
    accelerator.end_training()


if __name__ == "__main__":
    main()
