"""PNG plots of a run: training curves and the latest confusion matrix.

`python -m distcifar.plot OUTPUT_DIR` redraws them from OUTPUT_DIR/metrics.jsonl and
OUTPUT_DIR/confusion.json, for a run that trained with --tracking.plots false or one that is
still going; Tracker runs the same command in the background after each evaluation.

Figures are built with matplotlib's object API (no pyplot), so nothing here touches global
plotting state or needs a display.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from distcifar.cli import make_parser
from distcifar.errors import UsageError, entry_point
from distcifar.files import read_jsonl, replaced_atomically, write_atomically

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"  # train.py writes the run's whole config there
CONFUSION_FILE = "confusion.json"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"
RAW_LABEL = "eval, training weights (no average)"
# metrics.jsonl of runs started before the keys were namespaced (a resumed one holds both)
OLD_KEYS = {"train_loss": "train/loss", "lr": "train/lr", "eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy"}


def read_series(metrics_path: Path) -> dict[str, list[tuple[int, float]]]:
    """Each numeric metric in metrics.jsonl as (step, value) points in step order.

    A resumed run appends to the same file from its checkpoint's step on; its points replace
    those the earlier attempt wrote from that step on. Keys are the logged ones (`train/loss`, ...).
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for row in read_jsonl(metrics_path):  # the last line can be half-written while a run is training: left out
        step = row.get("step")
        if not isinstance(step, int):
            continue
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            points = series.setdefault(OLD_KEYS.get(key, key), [])
            while points and points[-1][0] >= step:
                points.pop()
            points.append((step, value))
    return series


def write_confusion(
    output_dir: Path, confusion: list[list[float]], classes: list[str], step: int, epoch: float, split: str
) -> None:
    """Save the latest confusion matrix ([true][predicted] counts) for draw_confusion."""
    record = {"step": step, "epoch": epoch, "split": split, "classes": list(classes), "confusion": confusion}
    write_atomically(Path(output_dir) / CONFUSION_FILE, json.dumps(record))


def _save(fig, path: Path) -> None:
    # Write then rename, so an image viewer or `plot` run never reads a half-written file.
    with replaced_atomically(path) as temporary:
        fig.savefig(temporary, format="png", dpi=100)


def training_loss_floor(config: dict) -> tuple[float, float] | None:
    """(label smoothing, the lowest training loss it allows) for a run's config.json, None without smoothing.

    Label smoothing e over K classes trains against targets of 1 - e + e/K and e/K, and cross-entropy against
    them cannot go below their entropy (0.50 for e 0.1 and 10 classes), while the evaluation loss is plain
    cross-entropy. Without this floor drawn, a training curve above the evaluation curve reads as a network
    held back when it may fit its training images almost exactly (docs/recipes.md)."""
    smoothing = config.get("optim", {}).get("label_smoothing", 0.0)
    classes = config.get("model", {}).get("num_classes", 10)
    if not smoothing:
        return None
    high, low = 1 - smoothing + smoothing / classes, smoothing / classes
    return smoothing, -(high * math.log(high) + (classes - 1) * low * math.log(low))


def draw_curves(
    series: dict[str, list[tuple[int, float]]], path: Path, loss_floor: tuple[float, float] | None = None
) -> None:
    """Loss, accuracy and learning rate against the optimizer step; `loss_floor` (training_loss_floor) is drawn
    under the training loss."""
    from matplotlib.figure import Figure  # imported here: it adds ~0.7 s to every training launch

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    loss_ax, accuracy_ax, lr_ax = fig.subplots(1, 3)
    panels = [
        # eval/raw_*: with train.ema_decay, the training weights' own evaluation beside the average's (eval/*)
        (loss_ax, "loss", [("train/loss", "train"), ("eval/loss", "eval"), ("eval/raw_loss", RAW_LABEL)]),
        (
            accuracy_ax,
            "accuracy",
            [("train/accuracy", "train"), ("eval/accuracy", "eval"), ("eval/raw_accuracy", RAW_LABEL)],
        ),
        (lr_ax, "learning rate", [("train/lr", None)]),
    ]
    for ax, quantity, lines in panels:
        for key, label in lines:
            if key in series:
                steps, values = zip(*series[key])
                is_eval = key.startswith("eval")  # eval: points at evaluations, in the same colour in every panel
                ax.plot(
                    steps,
                    values,
                    label=label,
                    color="C2" if key.startswith("eval/raw_") else "C1" if is_eval else "C0",
                    marker="o" if is_eval else None,
                    markersize=4,
                )
        if ax is loss_ax and loss_floor and "train/loss" in series:
            smoothing, floor = loss_floor
            floor_label = f"lowest training loss (label smoothing {smoothing:g})"
            ax.axhline(floor, color="gray", linestyle="--", label=floor_label)
        if any(label for key, label in lines if key in series):
            ax.legend()
        if not ax.lines:
            ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_title(quantity)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(quantity)
        ax.grid(alpha=0.3)
    if "eval/accuracy" in series:
        best_step, best = max(series["eval/accuracy"], key=lambda point: point[1])
        accuracy_ax.set_title(f"accuracy (best eval {best:.4g} at step {best_step})")
    _save(fig, path)


def draw_confusion(record: dict, path: Path) -> None:
    """The confusion matrix written by write_confusion, with counts in the cells."""
    counts = np.asarray(record["confusion"], dtype=float)
    names = record["classes"]
    total = counts.sum()
    accuracy = np.trace(counts) / total if total else 0.0

    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(counts, cmap="Blues")
    fig.colorbar(image, ax=ax, label="images", shrink=0.8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(
        f"{record['split']} set, epoch {record['epoch']:g}, step {record['step']}: {accuracy:.2%} of {total:g} correct"
    )
    dark = counts.max() / 2
    for true_class, row in enumerate(counts):
        for predicted_class, count in enumerate(row):
            ax.text(
                predicted_class,
                true_class,
                f"{count:g}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if count > dark else "black",
            )
    _save(fig, path)


def redraw(output_dir: Path) -> list[Path]:
    """Redraw curves.png (and confusion.png when confusion.json exists); return the files written."""
    output_dir = Path(output_dir)
    written = [output_dir / CURVES_PNG]
    config_path = output_dir / CONFIG_FILE
    loss_floor = training_loss_floor(json.loads(config_path.read_text())) if config_path.is_file() else None
    draw_curves(read_series(output_dir / METRICS_FILE), written[0], loss_floor)
    confusion_path = output_dir / CONFUSION_FILE
    if confusion_path.is_file():
        written.append(output_dir / CONFUSION_PNG)
        draw_confusion(json.loads(confusion_path.read_text()), written[1])
    return written


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = make_parser("distcifar-plot", f"Redraw {CURVES_PNG} and {CONFUSION_PNG} in a training output folder.")
    parser.add_argument("output_dir", type=str, help="The run's output folder (holds metrics.jsonl).")
    output_dir = Path(parser.parse_args(sys.argv[1:] if argv is None else argv).output_dir)
    if not output_dir.is_dir():
        raise UsageError(f"output folder '{output_dir}' does not exist")
    if not (output_dir / METRICS_FILE).is_file():
        raise UsageError(f"'{output_dir}' has no {METRICS_FILE} (has the run logged a step yet?)")
    for path in redraw(output_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
