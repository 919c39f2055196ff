"""Typed configuration: dataclasses with documented fields, read by jsonargparse.

    --config FILE.yaml   a recipe (YAML); later options override it
    --section.field V    one field; lists as [8,16,32], strings as they are typed

Each section checks its own values in `__post_init__` (checks that need the process count live where
it is known: TrainBatches, accelerator.build_accelerator). Every mistake (unknown key, wrong type,
impossible value) becomes a ConfigError: one line that names the field, turned into exit code 2
before any heavy work starts. How values are read (YAML 1.2) is said in cli.py.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from distcifar.cli import make_parser
from distcifar.errors import ConfigError, UsageError, one_line


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def repo_id_problem(name: str) -> str | None:
    """Why `name` is not a hub repository id (owner/name), or None when it is one."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        return str(err)
    return None


@dataclass
class ModelConfig:
    block_convs: list[int] = field(default_factory=lambda: [1, 2, 2, 2, 3, 3])
    """conv -> ReLU -> BatchNorm layers in each of the blocks."""
    block_channels: list[int] = field(default_factory=lambda: [60, 100, 160, 240, 340, 460])
    """Output channels of each block."""
    block_halve: list[bool] = field(default_factory=lambda: [False, True, False, True, False, True])
    """Whether each block halves the image size (2x2 average pooling)."""
    expert_reduction: int = 6
    """Channel reduction of the expert branch's hidden layer."""
    classifier_hidden: list[int] = field(default_factory=lambda: [800, 400, 200])
    """Hidden widths of the MLP classifier."""
    dropout: float = 0.5
    """Dropout after each hidden layer of the classifier."""
    num_classes: int = 10

    def __post_init__(self):
        _check(
            len(self.block_convs) == len(self.block_channels) == len(self.block_halve) > 0,
            "model.block_convs, model.block_channels and model.block_halve must be non-empty lists of one length",
        )
        _check(self.expert_reduction > 0, f"model.expert_reduction must be > 0, got {self.expert_reduction}")
        _check(
            min(self.block_convs) >= 1 and min(self.block_channels) >= self.expert_reduction,
            "model.block_convs must be >= 1 and model.block_channels >= model.expert_reduction",
        )
        _check(0 <= self.dropout < 1, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(self.num_classes > 1, f"model.num_classes must be > 1, got {self.num_classes}")


Augmentation = Literal["crop", "hflip", "vflip", "rotate", "color_jitter", "cutout"]


@dataclass
class DataConfig:
    name: str = "uoft-cs/cifar10"
    """Hub dataset, used when `path` is not set."""
    path: str | None = None
    """Local copy: a folder of parquet files, one file, or a save_to_disk folder."""
    cache_dir: str | None = None
    """Where decoded uint8 tensors (and each network's FLOP count) are kept (default $DISTCIFAR_CACHE, else
    $XDG_CACHE_HOME/distcifar, else ~/.cache/distcifar)."""
    train_limit: int = 0
    """Use the first N training rows (0 = all)."""
    eval_limit: int = 0
    """Use the first N evaluation rows (0 = all)."""
    val_size: int = 0
    """Hold out N training images as the evaluation split (0 = evaluate on test)."""
    augment: list[Augmentation] = field(default_factory=lambda: ["crop", "hflip"])
    """Augmentations, applied on the device to each image with its own parameters."""
    crop_padding: int = 4
    """Pixels added on each side before the random 32x32 crop."""
    crop_padding_mode: Literal["zeros", "reflect"] = "zeros"
    """What the crop's padding holds: zeros (black) or the image reflected at its edges (as David Page's ResNet-9
    recipe pads)."""
    hflip_mode: Literal["random", "alternate"] = "random"
    """augment: hflip. random: each image mirrored with probability 1/2, drawn anew each epoch. alternate (airbench's):
    each image mirrored at random in the first epoch and then the other way each epoch, so that any two consecutive
    epochs show it both ways."""
    rotate_degrees: float = 15.0
    """Largest rotation either way (augment: rotate)."""
    color_jitter: float = 0.2
    """Brightness, contrast and saturation factors are drawn from 1 +- this (augment: color_jitter)."""
    cutout_size: int = 12
    """Side of the square set to the dataset mean (0 after normalisation), centred anywhere in the image and cut
    off at its edges (augment: cutout)."""

    def __post_init__(self):
        for name in ("train_limit", "eval_limit", "val_size", "crop_padding"):
            _check(getattr(self, name) >= 0, f"data.{name} must be >= 0, got {getattr(self, name)}")
        _check(0 < self.cutout_size <= 32, f"data.cutout_size must be in 1..32, got {self.cutout_size}")
        _check(
            self.hflip_mode == "random" or "hflip" in self.augment,
            "data.hflip_mode alternate needs hflip in data.augment: add it there, or leave hflip_mode random",
        )


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    """Optimizer (sgd uses Nesterov momentum when `nesterov`)."""
    lr: float = 0.2
    """Peak learning rate."""
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False
    """Also decay BatchNorm and bias parameters (false: weight decay on conv and linear weights only)."""
    schedule: Literal["constant", "step", "cosine", "onecycle"] = "cosine"
    """Learning-rate schedule after the warm-up, in optimizer steps."""
    warmup_epochs: float = 1.0
    """Linear warm-up from lr/warmup_steps to lr."""
    step_epochs: float = 10.0
    """Period of the step schedule."""
    step_gamma: float = 0.5
    """Factor of the step schedule at each period."""
    label_smoothing: float = 0.1
    grad_clip: float = 0.0
    """Largest gradient norm (0 = no clipping)."""

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        for name in ("momentum", "weight_decay", "warmup_epochs", "grad_clip"):
            _check(getattr(self, name) >= 0, f"optim.{name} must be >= 0, got {getattr(self, name)}")
        _check(0 <= self.label_smoothing < 1, f"optim.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.step_epochs > 0, f"optim.step_epochs must be > 0, got {self.step_epochs}")


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 512
    """Global batch: per-device batch x processes x grad_accum_steps."""
    grad_accum_steps: int = 1
    eval_batch_size: int = 1000
    """Evaluation batch per device."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 where the hardware runs it natively (recent GPUs, CPUs with AVX-512 BF16 / AMX), else fp16 with
    loss scaling on a GPU and fp32 on a CPU. fp16: GPU only."""
    channels_last: bool = True
    compile: bool = False
    """torch.compile the model."""
    sync_batchnorm: bool = False
    """BatchNorm statistics over all processes (several GPUs only: PyTorch's SyncBatchNorm refuses CPU tensors)."""
    seed: int = 0
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs)."""
    log_every: int = 50
    """Optimizer steps between log lines (each one costs a host sync)."""
    eval_every_epochs: float = 1.0
    """Epochs between evaluations (0.5: twice an epoch, at the optimizer steps nearest each half); the last step is
    always evaluated."""
    eval_hflip: bool = False
    """Test-time augmentation: evaluate each image and its mirror image, and average their logits."""
    eval_translate: bool = False
    """Test-time augmentation: also evaluate each view shifted by one pixel up-left and one down-right (reflect
    padding), and average the logits of all views (with eval_hflip: six views)."""
    final_views: bool = True
    """After the last evaluation also report the accuracy with test-time views, the mirror and the mirror with
    1-pixel shifts, beside the plain one (8 more passes over the test images; false leaves them out)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights and BatchNorm statistics, updated after every optimizer
    step with this decay (e.g. 0.999; 0 = off). Evaluations, keep_best, stop_at_accuracy, final/ and its model card
    then use the averaged weights; the training weights' accuracy is reported beside it (eval/raw_accuracy)."""
    stop_at_accuracy: float = 0.0
    """End the run at the first evaluation whose accuracy reaches this (e.g. 0.93; 0 = off), with a checkpoint,
    final/ and summary.json, which then holds the training seconds and epochs it took."""
    collective_timeout_s: int = 300
    """A rank that stops answering ends the job after this many seconds."""
    deterministic: bool = False
    """Deterministic kernels only: cuDNN's kernel search off, torch.use_deterministic_algorithms on (with the cuBLAS
    workspace setting it needs). A GPU run is then bit-identical from run to run, at a cost in speed; a CPU run is
    bit-identical either way."""
    profile_steps: str | None = None
    """A:B records optimizer steps A to B (the first step is 1; B included) with torch.profiler: a trace for
    Perfetto or TensorBoard in OUTPUT_DIR/profile/ and a table of the top operators."""
    profile_all_ranks: bool = False
    """With profile_steps: a trace from every process (default: the main process only)."""

    def __post_init__(self):
        for name in (
            "epochs",
            "batch_size",
            "grad_accum_steps",
            "eval_batch_size",
            "log_every",
            "eval_every_epochs",
            "collective_timeout_s",
        ):
            _check(getattr(self, name) > 0, f"train.{name} must be > 0, got {getattr(self, name)}")
        _check(0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        _check(
            0 <= self.stop_at_accuracy <= 1,
            f"train.stop_at_accuracy must be in [0, 1] (0 = off), got {self.stop_at_accuracy}",
        )
        _check(self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _check(
            self.profile_steps is None or self.profile_window is not None,
            f"train.profile_steps must be A:B with 1 <= A <= B (optimizer steps, e.g. 3:5), got {self.profile_steps!r}",
        )
        _check(
            self.batch_size % self.grad_accum_steps == 0,
            f"train.batch_size ({self.batch_size}) must be divisible by "
            f"train.grad_accum_steps ({self.grad_accum_steps})",
        )

    @property
    def profile_window(self) -> tuple[int, int] | None:
        """train.profile_steps as (first, last) optimizer step, None when it is not set or not of the form A:B."""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(self.profile_steps or ""))
        if not match or not 1 <= int(match[1]) <= int(match[2]):
            return None
        return int(match[1]), int(match[2])


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save every N optimizer steps (0 = off). Saves also happen at each epoch end and on a stop signal."""
    every_minutes: float = 0.0
    """Save when this many minutes have passed since the last save (0 = off)."""
    keep: int = 3
    """Keep the newest K checkpoints."""
    keep_best: bool = False
    """Also keep the checkpoint with the best evaluation accuracy."""
    weights_only: bool = False
    """On resume load the model weights only and start a new schedule."""

    def __post_init__(self):
        _check(self.keep > 0, f"checkpoint.keep must be > 0, got {self.keep}")
        for name in ("every_steps", "every_minutes"):
            _check(getattr(self, name) >= 0, f"checkpoint.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class DDPConfig:
    """How DDP communicates gradients (several processes only; one process has no DDP and ignores it)."""

    comm_hook: Literal["none", "fp16", "bf16", "powersgd", "batched_powersgd"] = "none"
    """Gradient compression in the all-reduce: fp16/bf16 halve its bytes; powersgd sends a low-rank
    approximation of each weight's gradient (error feedback carries what it drops to the next step)."""
    powersgd_rank: int = 1
    """Rank of PowerSGD's approximation (higher: closer to the exact gradient, more bytes)."""
    powersgd_start_step: int = 1000
    """Optimizer steps of plain all-reduce before PowerSGD starts (PyTorch's default; >= 2). Counted from
    the start of each process: a resumed run warms up again, and PowerSGD's error feedback is not checkpointed."""
    bucket_cap_mb: float = 25.0
    """Gradient megabytes per all-reduce bucket (bigger: fewer messages; smaller: earlier overlap with backward)."""
    gradient_as_bucket_view: bool = False
    """Gradients are views into DDP's buckets: one gradient-sized copy less, in memory and per step."""
    static_graph: bool = False
    """The set of used parameters is the same at every step, so DDP can skip re-checking it."""

    def __post_init__(self):
        _check(self.powersgd_rank >= 1, f"ddp.powersgd_rank must be >= 1, got {self.powersgd_rank}")
        _check(
            self.powersgd_start_step >= 2,
            "ddp.powersgd_start_step must be >= 2 (PowerSGD's error feedback needs it), "
            f"got {self.powersgd_start_step}",
        )
        _check(self.bucket_cap_mb > 0, f"ddp.bucket_cap_mb must be > 0, got {self.bucket_cap_mb}")


@dataclass
class TrackingConfig:
    report_to: Literal["auto", "wandb", "tensorboard", "none"] = "auto"
    """auto: W&B when WANDB_MODE or W&B credentials are set, else none (metrics.jsonl is always written)."""
    project: str | None = None
    """W&B project (unset: $WANDB_PROJECT, else distcifar). Unset fields leave W&B's WANDB_* variables in charge."""
    entity: str | None = None
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    plots: bool = True
    """PNG curves and confusion matrix in OUTPUT_DIR."""


@dataclass
class HubConfig:
    private: bool = False
    """With --push_to_hub: create the repository as private (an existing repository keeps its visibility)."""


@dataclass
class Config:
    """distcifar's configuration: defaults, then --config FILE, then --section.field VALUE."""

    output_dir: str = "runs/default"
    """Checkpoints, metrics, plots, summary.json and the exported model."""
    resume: str = "auto"
    """auto: the newest good checkpoint in OUTPUT_DIR/checkpoints; never; or a checkpoint folder."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    push_to_hub: str | None = None
    """After training, upload OUTPUT_DIR/final (weights, config.json, model card) to this hub model repository
    (owner/name); needs a token (`hf auth login` or HF_TOKEN). A failed upload leaves the local export as it is."""
    hub: HubConfig = field(default_factory=HubConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)

    def __post_init__(self):
        if self.push_to_hub is not None:
            problem = repo_id_problem(self.push_to_hub)
            _check(
                problem is None,
                f"push_to_hub: '{self.push_to_hub}' is not a hub repository id such as owner/name ({problem})",
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from its `to_dict()` form (as stored in checkpoints and config.json)."""
    sections = typing.get_type_hints(Config)
    try:
        return Config(
            **{key: sections[key](**value) if isinstance(value, dict) else value for key, value in tree.items()}
        )
    except (KeyError, TypeError) as err:
        raise ConfigError(f"a stored config does not fit this version of distcifar ({err})") from None


def parse_config(
    argv: list[str], *, prog: str, description: str, add_arguments: Callable[[ArgumentParser], None] | None = None
) -> tuple[Config, Namespace]:
    """(Config, the namespace of the entry point's own arguments) from the command line."""
    parser = make_parser(prog, description)
    parser.add_argument(
        "--config", action=ActionConfigFile, help="A YAML recipe (see configs/); later options override it."
    )
    parser.add_class_arguments(Config, as_group=False)
    if add_arguments:
        add_arguments(parser)
    try:
        namespace = parser.parse_args(argv)
    except UsageError as err:
        raise ConfigError(str(err)) from None
    try:
        built = parser.instantiate(namespace)
        cfg = Config(**{f.name: built[f.name] for f in dataclasses.fields(Config)})
    except (ValueError, TypeError) as err:
        raise ConfigError(one_line(err)) from None
    return cfg, built
