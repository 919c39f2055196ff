"""Evaluate a checkpoint or an export on the test split, every image counted once on any number of processes.

    accelerate launch distcifar/evaluate.py runs/x/checkpoints/step_00000480 [--output eval.json]
    python -m distcifar.evaluate runs/x/final --data.path ../shared/data/cifar10

Prints accuracy, loss, per-class accuracy and the confusion matrix as a table, and as JSON to --output.
Other options are config overrides (--data.path, --data.eval_limit, --train.eval_batch_size ...).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import load

from distcifar.checkpoint import CheckpointError, read_verified
from distcifar.config import ModelConfig, parse_config
from distcifar.data import CLASSES, load_splits
from distcifar.engine import build, evaluate
from distcifar.model import DistCifarNet
from distcifar.cli import entry_point
from distcifar.runtime import build_accelerator


def load_model(path: Path) -> DistCifarNet:
    """A DistCifarNet from a training checkpoint (step_* folder) or an export (final/)."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder (give a checkpoints/step_* folder or an export such as OUTPUT_DIR/final)")
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


def add_arguments(parser) -> None:
    parser.add_argument("weights", type=str, help="A checkpoints/step_* folder or an export such as OUTPUT_DIR/final.")
    parser.add_argument("--output", type=str, default=None, help="Also write the result as JSON to this file.")


@entry_point
def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_config(sys.argv[1:] if argv is None else argv, prog="distcifar-evaluate",
                             description=__doc__, add_arguments=add_arguments)
    path = Path(args.weights)
    model = load_model(path)
    cfg.model = model.config
    accelerator = build_accelerator(cfg)
    with accelerator.main_process_first():
        _, eval_split, eval_name = load_splits(cfg.data, cfg.model.num_classes)
    result = evaluate(accelerator, build(cfg, accelerator, eval_split, model=model), cfg.model.num_classes)
    result.update(eval_split=eval_name, checkpoint=str(path), num_processes=accelerator.num_processes)
    if accelerator.is_main_process:
        print(format_table(result))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2))
    accelerator.end_training()


if __name__ == "__main__":
    main()
