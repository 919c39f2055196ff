"""Helpers the tests share, one module per need, all importable as `support`:

    support.repo         the repository, the tiny network and run settings, read_metrics
    support.data         a learnable synthetic dataset in the hub's schema
    support.launch       real launches: commands, train.py arguments, start, finish, kill, the probes' Accelerator
    support.wandb_files  readers of offline W&B runs
    support.slurm        whether the local Slurm cluster answers

The tests in tests/unit and tests/launch import it as `support` (pytest puts tests/ on sys.path, where conftest.py
is); the probe scripts in tests/probes put tests/ on sys.path themselves and import it too."""

from support.data import CIFAR10_MEAN, CIFAR10_STD, make_images, write_parquet_dataset
from support.launch import (
    ACCELERATE,
    TORCHRUN,
    accelerate_launch,
    finish,
    free_port,
    kill_tree,
    launch_command,
    probe,
    probe_accelerator,
    process_with_env,
    run,
    start,
    torchrun,
    train_args,
    worker_exit_codes,
)
from support.repo import (
    CLASS_NAMES,
    REPO,
    RESTART_ARGS,
    RESTART_TOTAL_STEPS,
    TINY_MODEL,
    TINY_MODEL_CONFIG,
    TRAIN,
    read_metrics,
)
from support.slurm import slurm_answers
from support.wandb_files import offline_runs, read_offline_run, read_wandb_records_so_far

__all__ = [
    "ACCELERATE",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CLASS_NAMES",
    "REPO",
    "RESTART_ARGS",
    "RESTART_TOTAL_STEPS",
    "TINY_MODEL",
    "TINY_MODEL_CONFIG",
    "TORCHRUN",
    "TRAIN",
    "accelerate_launch",
    "finish",
    "free_port",
    "kill_tree",
    "launch_command",
    "make_images",
    "offline_runs",
    "probe",
    "probe_accelerator",
    "process_with_env",
    "read_metrics",
    "read_offline_run",
    "read_wandb_records_so_far",
    "run",
    "slurm_answers",
    "start",
    "torchrun",
    "train_args",
    "worker_exit_codes",
    "write_parquet_dataset",
]
