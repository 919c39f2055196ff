"""Evaluate a checkpoint or an export on the test split, every image counted once on any number of processes.

    accelerate launch distcifar/evaluate.py runs/x/checkpoints/step_00000480 [--output eval.json]
    python -m distcifar.evaluate runs/x/final --data.path ../shared/data/cifar10
    python -m distcifar.evaluate owner/name --data.path ../shared/data/cifar10   # an export on the hub

Prints accuracy, loss, per-class accuracy and the confusion matrix as a table, and as JSON to --output.
Other options are config overrides (--data.path, --data.eval_limit, --train.eval_batch_size ...;
--train.eval_hflip true averages each image's logits with its mirror image's, --train.eval_translate true adds
each view shifted by one pixel up-left and down-right). --recompute_bn replaces the
BatchNorm running statistics by those of the training images before evaluating (docs/recipes.md).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.optim.swa_utils import update_bn

from distcifar.accelerator import build_accelerator
from distcifar.checkpoint_format import evaluated_weights, load_fitting
from distcifar.cli import columns
from distcifar.config import ModelConfig, parse_config, repo_id_problem
from distcifar.data import CLASSES, Split, load_splits, normalize
from distcifar.engine import evaluate, prepare_for_evaluation
from distcifar.errors import CheckpointError, entry_point, one_line
from distcifar.model import DistCifarNet, memory_format
from distcifar.ranks import end_run


def load_model(path: Path) -> DistCifarNet:
    """A DistCifarNet from a training checkpoint (step_* folder: its weight average when it holds one, as the run
    evaluated it), an export (final/) or a hub repository id."""
    if not path.exists() and repo_id_problem(str(path)) is None:
        return load_model(_hub_snapshot(str(path)))
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such folder (give a checkpoints/step_* folder or an export such as OUTPUT_DIR/final)"
        )
    if (path / "manifest.json").exists():
        config, weights = evaluated_weights(path)
        model = DistCifarNet(ModelConfig(**config["model"]))
        load_fitting(path, model, weights)
        return model
    if (path / "model.safetensors").exists() and (path / "config.json").exists():
        return DistCifarNet.from_pretrained(path)
    raise CheckpointError(
        f"{path}: neither a checkpoint (manifest.json) nor an export (model.safetensors + config.json)"
    )


def recompute_bn_statistics(model: torch.nn.Module, train: Split, device, batch_size: int = 500) -> None:
    """Each BatchNorm layer's running statistics recomputed over the training images, un-augmented, with
    torch.optim.swa_utils.update_bn: the average of the batches' means and variances, in place of the moving average
    kept during training (for a weight average, the statistics of the averaged weights themselves)."""
    batches = (normalize(images.to(device)) for images in train.images.split(batch_size))
    update_bn(batches, model.to(device), device=device)


def _hub_snapshot(repo_id: str) -> Path:
    """The local folder of the hub export `repo_id` (downloaded, or from the HF cache: offline with HF_HUB_OFFLINE=1).

    Only config.json and model.safetensors are fetched, and the export is then read like a local one, so a
    repository holding pickled weights instead is refused rather than unpickled."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        files = [hf_hub_download(repo_id, name) for name in ("config.json", "model.safetensors")]
    except LocalEntryNotFoundError:
        why = "the hub cannot be reached (or HF_HUB_OFFLINE is set) and it is not in the Hugging Face cache"
    except RepositoryNotFoundError:
        why = "the hub has no such model repository (or it is private and no token was given)"
    except EntryNotFoundError as err:
        why = f"the repository is not a distcifar export ({one_line(err, 200)})"
    except OSError as err:
        why = f"the download failed ({type(err).__name__}: {one_line(err, 200)})"
    else:
        return Path(files[-1]).parent
    raise CheckpointError(f"{repo_id}: no such local folder, and as a hub model id: {why}")


def format_table(result: dict) -> str:
    names = CLASSES[: len(result["per_class_accuracy"])]
    rows = [["class", "accuracy", "confusion (rows: true, columns: predicted)"]]
    for name, acc, row in zip(names, result["per_class_accuracy"], result["confusion"]):
        rows.append([name, f"{acc:.4f}", " ".join(f"{n:>5}" for n in row)])
    summary = (
        f"{result['eval_split']}: accuracy {result['eval_accuracy']:.4f}  loss {result['eval_loss']:.4f}  "
        f"({result['eval_samples']} images)"
    )
    return "\n".join([summary, "", *columns(rows, "<><")])


def add_arguments(parser) -> None:
    parser.add_argument(
        "weights",
        type=str,
        help="A checkpoints/step_* folder, an export such as OUTPUT_DIR/final, or "
        "a hub model id (owner/name) of an export, read from the Hugging Face cache when it is there.",
    )
    parser.add_argument("--output", type=str, default=None, help="Also write the result as JSON to this file.")
    parser.add_argument(
        "--recompute_bn",
        action="store_true",
        help="Recompute the BatchNorm running statistics over the training images before evaluating.",
    )


@entry_point
def main(argv: list[str] | None = None) -> None:
    cfg, args = parse_config(
        sys.argv[1:] if argv is None else argv,
        prog="distcifar-evaluate",
        description=__doc__,
        add_arguments=add_arguments,
    )
    path = Path(args.weights)
    model = load_model(path)
    cfg.model = model.config
    accelerator = build_accelerator(cfg)
    with accelerator.main_process_first():
        train_split, eval_split, eval_name = load_splits(cfg.data, cfg.model.num_classes)
    if args.recompute_bn:  # every rank over all training images: the same statistics on each
        recompute_bn_statistics(model, train_split, accelerator.device)
    model, loader = prepare_for_evaluation(cfg, accelerator, model, eval_split)
    result = evaluate(
        accelerator,
        model,
        loader,
        num_classes=cfg.model.num_classes,
        hflip=cfg.train.eval_hflip,
        translate=cfg.train.eval_translate,
        layout=memory_format(cfg.train.channels_last),
    )
    result.update(
        eval_split=eval_name,
        checkpoint=str(path),
        num_processes=accelerator.num_processes,
        eval_hflip=cfg.train.eval_hflip,
        eval_translate=cfg.train.eval_translate,
        recompute_bn=args.recompute_bn,
    )
    if accelerator.is_main_process:
        print(format_table(result))
        if args.output:
            Path(args.output).write_text(json.dumps(result, indent=2))
    end_run(accelerator)  # every rank together; skips the teardown that can abort with several processes


if __name__ == "__main__":
    main()
