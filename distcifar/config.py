"""Typed training configuration: dataclasses filled from a YAML file, then from `--section.field VALUE`.

Every mistake (unknown key, wrong type, impossible value) raises ConfigError with one line that
says what is wrong; train.py turns it into exit code 2 before any heavy work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A usage error in the configuration or the command line (exit code 2)."""


@dataclass
class ModelConfig:
    block_convs: list[int] = field(default_factory=lambda: [1, 2, 2, 2, 3, 3])
    block_channels: list[int] = field(default_factory=lambda: [60, 100, 160, 240, 340, 460])
    block_halve: list[bool] = field(default_factory=lambda: [False, True, False, True, False, True])
    expert_reduction: int = 6
    classifier_hidden: list[int] = field(default_factory=lambda: [800, 400, 200])
    dropout: float = 0.5
    num_classes: int = 10


AUGMENTATIONS = ("crop", "hflip", "vflip", "rotate", "color_jitter")


@dataclass
class DataConfig:
    name: str = "uoft-cs/cifar10"  # hub dataset, used when `path` is not set
    path: str | None = None  # local copy: a parquet folder/file, a save_to_disk folder
    cache_dir: str | None = None  # decoded uint8 tensors; default ~/.cache/distcifar
    train_limit: int = 0  # first N training rows (0 = all)
    eval_limit: int = 0  # first N evaluation rows (0 = all)
    val_size: int = 0  # carve a validation split from train (0 = evaluate on test)
    augment: list[str] = field(default_factory=lambda: ["crop", "hflip"])
    crop_padding: int = 4
    rotate_degrees: float = 15.0
    color_jitter: float = 0.2  # brightness/contrast/saturation factor range 1 +- this


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (Nesterov when nesterov) | adam | adamw
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False  # False: no weight decay on BatchNorm and bias parameters
    schedule: str = "cosine"  # constant | step | cosine | onecycle
    warmup_epochs: float = 1.0
    step_epochs: float = 10.0  # StepLR period (schedule: step)
    step_gamma: float = 0.5
    label_smoothing: float = 0.1
    grad_clip: float = 0.0  # max gradient norm (0 = off)


@dataclass
class TrainConfig:
    epochs: int = 40
    batch_size: int = 512  # global: per-device batch x processes x grad_accum_steps
    grad_accum_steps: int = 1
    eval_batch_size: int = 1000  # per device
    mixed_precision: str = "auto"  # auto (bf16) | no | bf16 | fp16 (GPU only)
    channels_last: bool = True
    compile: bool = False
    sync_batchnorm: bool = False
    seed: int = 0
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    log_every: int = 50  # optimizer steps between log lines (and host syncs)
    eval_every_epochs: int = 1
    collective_timeout_s: int = 300  # a rank that stops answering ends the job after this long


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0 = off
    every_minutes: float = 0.0  # 0 = off
    keep: int = 3  # newest K checkpoints kept
    keep_best: bool = False  # also keep the one with the best eval accuracy
    weights_only: bool = False  # resume: load model weights only, start a new schedule


@dataclass
class TrackingConfig:
    report_to: str = "auto"  # auto (wandb if WANDB_MODE or credentials are set) | wandb | tensorboard | none
    project: str = "distcifar"
    entity: str | None = None
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    plots: bool = True  # PNG curves and confusion matrix in OUTPUT_DIR


@dataclass
class Config:
    output_dir: str = "runs/default"
    resume: str = "auto"  # auto | never | PATH
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "optim.name": ("sgd", "adam", "adamw"),
    "optim.schedule": ("constant", "step", "cosine", "onecycle"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "tracking.report_to": ("auto", "wandb", "tensorboard", "none"),
}


def _close_match(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value, hint, key: str):
    """Check `value` against the field's type hint, converting only where it is lossless."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r} (quote it in YAML, e.g. '\"no\"')")
    raise TypeError(f"unsupported config type {hint} for {key}")


def _set(cfg: Config, dotted: str, value, from_cli: bool) -> None:
    obj, parts = cfg, dotted.split(".")
    for depth, name in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if name not in names:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown config key '{dotted}' in {where}{_close_match(name, names)}")
        if depth == len(parts) - 1:
            hint = typing.get_type_hints(type(obj))[name]
            if dataclasses.is_dataclass(hint):
                raise ConfigError(f"'{dotted}' is a section; set its fields, e.g. --{dotted}.<field> VALUE")
            if from_cli and hint is not str and isinstance(value, str):
                value = yaml.safe_load(value) if value != "" else None
            setattr(obj, name, _coerce(value, hint, dotted))
        else:
            obj = getattr(obj, name)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"'{'.'.join(parts[:depth + 1])}' is not a section")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def validate(cfg: Config) -> None:
    for key, options in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise ConfigError(f"{key}: '{value}' is not one of {', '.join(options)}{_close_match(value, options)}")
    positive = {
        "optim.lr": cfg.optim.lr,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum_steps": cfg.train.grad_accum_steps,
        "train.eval_batch_size": cfg.train.eval_batch_size,
        "train.log_every": cfg.train.log_every,
        "train.eval_every_epochs": cfg.train.eval_every_epochs,
        "train.collective_timeout_s": cfg.train.collective_timeout_s,
        "checkpoint.keep": cfg.checkpoint.keep,
        "model.expert_reduction": cfg.model.expert_reduction,
        "model.num_classes": cfg.model.num_classes,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    non_negative = {
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.momentum": cfg.optim.momentum,
        "optim.warmup_epochs": cfg.optim.warmup_epochs,
        "optim.label_smoothing": cfg.optim.label_smoothing,
        "optim.grad_clip": cfg.optim.grad_clip,
        "data.train_limit": cfg.data.train_limit,
        "data.eval_limit": cfg.data.eval_limit,
        "data.val_size": cfg.data.val_size,
        "data.crop_padding": cfg.data.crop_padding,
        "train.max_steps": cfg.train.max_steps,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "checkpoint.every_minutes": cfg.checkpoint.every_minutes,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}")
    if not 0 <= cfg.optim.label_smoothing < 1:
        raise ConfigError(f"optim.label_smoothing must be in [0, 1), got {cfg.optim.label_smoothing}")
    if cfg.optim.schedule == "step" and cfg.optim.step_epochs <= 0:
        raise ConfigError(f"optim.step_epochs must be > 0, got {cfg.optim.step_epochs}")
    m = cfg.model
    if not (len(m.block_convs) == len(m.block_channels) == len(m.block_halve)) or not m.block_convs:
        raise ConfigError("model.block_convs, model.block_channels and model.block_halve must be non-empty lists of one length")
    if min(m.block_convs) < 1 or min(m.block_channels) < m.expert_reduction:
        raise ConfigError("model.block_convs must be >= 1 and model.block_channels >= model.expert_reduction")
    for name in cfg.data.augment:
        if name not in AUGMENTATIONS:
            raise ConfigError(f"data.augment: unknown augmentation '{name}'{_close_match(name, AUGMENTATIONS)}; choose from {', '.join(AUGMENTATIONS)}")
    if cfg.train.batch_size % cfg.train.grad_accum_steps:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by train.grad_accum_steps ({cfg.train.grad_accum_steps})")


def load_config(argv: list[str]) -> Config:
    """Build the config from `[--config FILE] [--key VALUE | --key=VALUE ...]`."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}': options look like --section.field VALUE")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv):
            key, value = arg[2:], argv[i + 1]
            i += 1
        else:
            raise ConfigError(f"option '{arg}' needs a value")
        pairs.append((key.replace("-", "_") if "." not in key else key, value))
        i += 1

    cfg = Config()
    config_files = [v for k, v in pairs if k == "config"]
    for path in config_files:
        if not Path(path).is_file():
            raise ConfigError(f"config file '{path}' does not exist (the recipes are in configs/)")
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of sections, got {type(tree).__name__}")
        for key, value in flatten(tree).items():
            _set(cfg, key, value, from_cli=False)
    for key, value in pairs:
        if key != "config":
            _set(cfg, key, value, from_cli=True)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> Config:
    """Rebuild a Config from its `to_dict()` form (as stored in checkpoints)."""
    cfg = Config()
    for key, value in flatten(tree).items():
        _set(cfg, key, value, from_cli=False)
    return cfg
