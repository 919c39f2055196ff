"""The exported model: OUTPUT_DIR/final (weights, config.json, a model card) and its upload to the hub.

    DistCifarNet.from_pretrained("runs/cpu/final")     # or a hub repository id, "owner/name"

The model card (final/README.md) says what the model is and how it was made: architecture, parameter
count, the input it expects (CIFAR-10 mean/std on [0, 1] RGB, 32x32), the training recipe and config,
test and per-class accuracy, and a usage snippet. `--push_to_hub REPO` uploads the folder once the run's
results are on disk; a failed upload is one error line and exit code 1, and the local export stays.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from distcifar.data import CIFAR10_MEAN, CIFAR10_STD, CLASSES
from distcifar.errors import PushFailed, PushUnavailable, one_line
from distcifar.files import follow_umask
from distcifar.ranks import fail_together, print_once


def write_final(model, folder: Path, cfg, summary: dict) -> Path:
    """Write `folder` (OUTPUT_DIR/final): model.safetensors, config.json and README.md, the model card."""
    folder = Path(folder)
    (folder / "README.md").unlink(missing_ok=True)  # save_pretrained keeps an existing card; this run's card wins
    location = cfg.push_to_hub or str(folder)
    model.save_pretrained(folder, config=cfg.model, model_card_kwargs=dict(cfg=cfg, summary=summary, location=location))
    for weights in folder.glob("*.safetensors"):
        follow_umask(weights)  # safetensors makes it 0600, unlike config.json and README.md beside it
    return folder


def check_push(cfg) -> None:
    """Before training: --push_to_hub needs the network and a token (the repo id's form is checked in Config)."""
    if cfg.push_to_hub is None:
        return
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PushUnavailable(
            f"--push_to_hub {cfg.push_to_hub} needs the hub, but HF_HUB_OFFLINE is set; unset it or drop --push_to_hub"
        )
    if get_token() is None:
        raise PushUnavailable(
            f"--push_to_hub {cfg.push_to_hub} needs a Hugging Face token: run `hf auth login` or set HF_TOKEN"
        )


def push(accelerator, folder: Path, cfg) -> str | None:
    """Upload `folder` to the model repository cfg.push_to_hub (created if missing, private with
    --hub.private true) from the main process. Call on every rank: a failure raises PushFailed on all."""
    if cfg.push_to_hub is None:
        return None
    url, failure = None, None
    if accelerator.is_main_process:
        from huggingface_hub import HfApi

        api = HfApi()
        try:
            api.create_repo(cfg.push_to_hub, repo_type="model", private=cfg.hub.private, exist_ok=True)
            commit = api.upload_folder(
                repo_id=cfg.push_to_hub,
                folder_path=folder,
                repo_type="model",
                commit_message=f"distcifar: export of {Path(cfg.output_dir).name}",
            )
            url = f"{api.endpoint}/{cfg.push_to_hub}"
            print_once(f"pushed {folder} to {url} ({commit.oid[:10]})")
        except Exception as err:  # whatever the hub client raises: the run's results are already on disk
            detail = one_line(err, 300)
            private = " --private" if cfg.hub.private else ""
            failure = (
                f"could not push {folder} to the hub repository {cfg.push_to_hub} ({type(err).__name__}: {detail}); "
                "the run and its export are complete: upload later with "
                f"`hf upload {cfg.push_to_hub} {folder}{private}`"
            )
    fail_together(accelerator, PushFailed, failure)
    return url


# ---------------------------------------------------------------------------------------------
# The model card


class _RecipeDumper(yaml.SafeDumper):
    """Block-style YAML with lists on one line, as the recipes in configs/ are written."""


_RecipeDumper.add_representer(
    list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=True)
)


def _architecture(model) -> str:
    c = model.config
    size, rows = 16, []
    for i, (convs, channels, halve) in enumerate(zip(c.block_convs, c.block_channels, c.block_halve), 1):
        size = size // 2 if halve else size
        rows.append(f"| {i} | {convs} | {channels} | {'yes' if halve else 'no'} | {size}x{size} |")
    hidden = " -> ".join(str(h) for h in c.classifier_hidden) or "none"
    return "\n".join(
        [
            "- **Stem**: conv 3->12 (3x3), ReLU, conv 12->32 (3x3), ReLU, 4x4 average pool with stride 2 "
            "(32x32 -> 16x16).",
            f"- **{len(c.block_convs)} blocks.** Each runs a chain of conv (3x3) -> ReLU -> BatchNorm layers and adds "
            "up their "
            f"outputs, each weighted per image by an *expert branch* (global average pool -> FC (channels -> channels/"
            f"{c.expert_reduction}) -> ReLU -> FC -> softmax over the block's conv layers), plus a 1x1 conv skip; "
            "then ReLU "
            "and, where the block halves the size, 2x2 average pooling.",
            "",
            "| block | conv layers | output channels | halves | output size |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"- **Classifier**: 2x2 adaptive average pool, flatten, hidden fully connected layers {hidden} "
            "(ReLU, dropout "
            f"{c.dropout} after each), then {c.num_classes} logits.",
            f"- **Parameters**: {sum(p.numel() for p in model.parameters()):,} (plus BatchNorm running statistics).",
        ]
    )


def _usage(location: str) -> str:
    return f'''```python
import numpy as np
import torch
from PIL import Image

from distcifar.model import DistCifarNet

model = DistCifarNet.from_pretrained("{location}").eval()
mean = torch.tensor({list(CIFAR10_MEAN)}).view(1, 3, 1, 1)
std = torch.tensor({list(CIFAR10_STD)}).view(1, 3, 1, 1)
classes = {list(CLASSES)}

image = Image.open("image.png").convert("RGB").resize((32, 32))
x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 255  # [1, 3, 32, 32], RGB in [0, 1]
with torch.no_grad():
    probabilities = model((x - mean) / std).softmax(1)[0]
print(classes[int(probabilities.argmax())], f"{{float(probabilities.max()):.1%}}")
```'''


def _training(cfg, summary: dict | None) -> str:
    o, t, d = cfg.optim, cfg.train, cfg.data
    source = f"the hub dataset `{d.name}`" if not d.path else "a local copy of CIFAR-10 (`data.path`)"
    limits = (f", the first {d.train_limit} training images" if d.train_limit else "") + (
        f", {d.val_size} training images held out for validation" if d.val_size else ""
    )
    optimizer = {
        "sgd": f"SGD (momentum {o.momentum}{', Nesterov' if o.nesterov else ''})",
        "adam": "Adam",
        "adamw": "AdamW",
    }[o.name]
    lines = [
        f"- **Data**: {source}{limits}; augmentation on the device: {', '.join(d.augment) or 'none'}"
        + (f" (crop padding {d.crop_padding}, {d.crop_padding_mode})" if "crop" in d.augment else "")
        + ("; hflip alternates by epoch" if d.hflip_mode == "alternate" else "")
        + ".",
        f"- **Optimizer**: {optimizer}, peak learning rate {o.lr}, weight decay {o.weight_decay} "
        f"({'on every parameter' if o.decay_norm_and_bias else 'conv and linear weights only'}), label smoothing "
        f"{o.label_smoothing}" + (f", gradient clipping at norm {o.grad_clip}" if o.grad_clip else "") + ".",
        f"- **Schedule**: {o.warmup_epochs} warm-up epochs, then {o.schedule}"
        + (f" (x{o.step_gamma} every {o.step_epochs} epochs)" if o.schedule == "step" else "")
        + ", in optimizer steps.",
        f"- **Batch and length**: global batch {t.batch_size} ({t.grad_accum_steps} accumulation step(s)), "
        f"{t.epochs} epochs" + (f", at most {t.max_steps} steps" if t.max_steps else "") + f", seed {t.seed}.",
    ]
    if t.ema_decay:
        lines.append(
            f"- **Weights**: the exponential moving average of the training weights and BatchNorm statistics, "
            f"updated after every optimizer step with decay {t.ema_decay} (`train.ema_decay`)."
        )
    if summary:
        lines.append(
            f"- **Run**: {summary['global_step']} optimizer steps ({summary['epochs']:g} epochs) on "
            f"{summary['num_processes']} process(es), mixed precision {summary['mixed_precision']}, "
            f"{summary['train_seconds']:.0f} s of training."
            + (
                f" It stopped at the first evaluation that reached {t.stop_at_accuracy:.2%} (`train.stop_at_accuracy`)."
                if summary.get("seconds_to_target") is not None
                else ""
            )
        )
        lines.append(
            f"- **Compute**: {summary['train_flops_per_image'] / 1e9:.3g} GFLOP per training image (forward + "
            "backward, as `torch.utils.flop_counter.FlopCounterMode` counts them: convolutions and matrix products)."
        )
    config = yaml.dump(cfg.to_dict(), Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False).strip()
    lines += [
        "",
        "The run's full configuration, a recipe for `distcifar/train.py --config`:",
        "",
        "```yaml",
        config,
        "```",
    ]
    return "\n".join(lines)


def _results(summary: dict) -> str:
    split = summary.get("eval_split") or "test"
    lines = [
        f"{split.capitalize()} accuracy **{summary['test_accuracy']:.2%}** (loss {summary['test_loss']:.4f}) on "
        f"{summary['eval_samples']} {split} images.",
    ]
    if "test_accuracy_raw" in summary:
        lines.append(
            f"These are the weight average's. The training weights themselves, without the average: "
            f"{summary['test_accuracy_raw']:.2%} (loss {summary['test_loss_raw']:.4f})."
        )
    lines += ["", "| class | accuracy |", "|---|---|"]
    lines += [f"| {name} | {acc:.2%} |" for name, acc in zip(CLASSES, summary["per_class_accuracy"])]
    return "\n".join(lines)


def model_card(model, *, cfg=None, summary: dict | None = None, location: str = "OUTPUT_DIR/final") -> ModelCard:
    """The card of `model`: with the run's config and summary (train.py) it also holds the recipe and results."""
    data = ModelCardData(
        library_name="distcifar",
        tags=["image-classification", "cifar10", "pytorch_model_hub_mixin"],
        pipeline_tag="image-classification",
        datasets=[cfg.data.name if cfg else "uoft-cs/cifar10"],
        metrics=["accuracy"],
    )
    if summary:
        data.model_name = cfg.push_to_hub or f"distcifar-{Path(cfg.output_dir).name}" if cfg else "distcifar"
        data.eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=data.datasets[0],
                dataset_name="CIFAR-10",
                dataset_split=summary.get("eval_split") or "test",
                metric_type="accuracy",
                metric_value=round(summary["test_accuracy"], 4),
            )
        ]
    headline = f", {summary['test_accuracy']:.2%} {summary.get('eval_split') or 'test'} accuracy" if summary else ""
    sections = [
        f"# distcifar CIFAR-10 network{headline}",
        "A CIFAR-10 image classifier trained with distcifar (a Hugging Face Accelerate training loop): the seed "
        "network, a conv stem, expert-weighted conv blocks and an MLP classifier. "
        f"It takes 32x32 RGB images and returns {model.config.num_classes} logits, one per class in this order: "
        f"{', '.join(CLASSES[: model.config.num_classes])}.",
        "## Architecture",
        _architecture(model),
        "## Input",
        "A float tensor `[batch, 3, 32, 32]`: RGB in [0, 1] (pixel / 255), standardised per channel with the "
        f"CIFAR-10 statistics, `(x - mean) / std` with mean = {list(CIFAR10_MEAN)} and std = {list(CIFAR10_STD)} "
        "(`distcifar.data.normalize` does this). Resize other images to 32x32 first.",
        "## Usage",
        "With `distcifar` installed (`pip install -e .` in its repository), torch, numpy and Pillow:",
        _usage(location),
        "## Training",
        _training(cfg, summary)
        if cfg
        else "This export was saved outside `distcifar/train.py`: its training run is not recorded here.",
        "## Results",
        _results(summary) if summary else "Not evaluated at export time; `distcifar/evaluate.py` measures it.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
