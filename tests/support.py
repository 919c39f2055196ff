"""Helpers the tests share, the one home for them: the repository, a learnable synthetic dataset in the hub's
schema, the tiny network, real launches (launcher commands, train.py arguments, starting, finishing and killing a
launch), the Accelerator the probes build, and readers of what a run leaves behind (metrics, W&B files, Slurm).

The tests in tests/unit and tests/launch import it as `support` (pytest puts tests/ on sys.path, where conftest.py
is); the probe scripts in tests/probes put tests/ on sys.path themselves and import it too."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent  # the repository: the one definition the tests and probes use
if str(REPO) not in sys.path:  # a probe run by a launcher imports distcifar from here, installed or not
    sys.path.insert(0, str(REPO))

from distcifar.config import ModelConfig  # noqa: E402

TRAIN = REPO / "distcifar" / "train.py"
PROBES = REPO / "tests" / "probes"
BIN = Path(sys.executable).parent
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# A network small enough for CPU tests that are about the loop, not the seed network's accuracy.
TINY_MODEL_CONFIG = ModelConfig(block_channels=[8, 8, 16, 16, 24, 24], classifier_hidden=[32])

# The restart experiment (tests/launch/test_restarts.py, scripts/restart_trials.py): 8 steps an epoch, 32 in all, a
# checkpoint every 3 steps; fp32 whatever the CPU, so that runs compare bit for bit
RESTART_ARGS = ("--train.epochs", "4", "--checkpoint.every_steps", "3", "--train.mixed_precision", "no")
RESTART_TOTAL_STEPS = 32
TINY_MODEL = ["--model.block_channels", "[8,8,16,16,24,24]", "--model.classifier_hidden", "[32]"]


def make_images(labels, seed: int = 0, size: int = 32, mode: str = "RGB"):
    """Clearly learnable synthetic images: each class one solid, well-separated colour plus modest noise.

    A solid colour survives every crop, flip, rotation and mild colour jitter; the noise keeps images of
    one class distinct. The tiny run of train_args reaches 0.87-1.0 test accuracy after 8 epochs; at 2
    epochs (16 steps) it is limited by the recipe (BatchNorm running statistics), not by these images.
    """
    from PIL import Image

    palette = np.array(
        [  # the corners of the RGB cube (kept off 0/255 so the noise is not clipped), grey, orange
            (235, 20, 20),
            (20, 235, 20),
            (20, 20, 235),
            (235, 235, 20),
            (235, 20, 235),
            (20, 235, 235),
            (235, 235, 235),
            (20, 20, 20),
            (128, 128, 128),
            (235, 128, 20),
        ],
        dtype=np.float64,
    )
    rng = np.random.default_rng(seed)
    images = []
    for label in labels:
        pixels = np.clip(palette[label] + rng.normal(0, 8, size=(size, size, 3)), 0, 255)
        image = Image.fromarray(pixels.round().astype(np.uint8), "RGB")
        images.append(image.convert(mode) if mode != "RGB" else image)
    return images


def write_parquet_dataset(
    folder: Path,
    train_rows: int = 256,
    test_rows: int = 101,
    *,
    column: str = "img",
    mode: str = "RGB",
    size: int = 32,
    bad_label: int | None = None,
) -> Path:
    """A dataset with the hub's cifar10 features, as train.parquet and test.parquet in `folder`."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    for split, rows, seed in (("train", train_rows, 1), ("test", test_rows, 2)):
        labels = [int(x) for x in np.random.default_rng(seed).integers(0, 10, rows)]
        features = datasets.Features({column: datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
        images = make_images(labels, seed, size, mode)
        if bad_label is not None:
            labels[3] = bad_label
            features["label"] = datasets.Value("int64")
        datasets.Dataset.from_dict({column: images, "label": labels}, features=features).to_parquet(
            folder / f"{split}.parquet"
        )
    return folder


def probe(name: str) -> str:
    """The path of tests/probes/<name>.py, a script a launcher runs in place of train.py."""
    path = PROBES / f"{name}.py"
    assert path.is_file(), f"no probe {path}"
    return str(path)


def tool(name: str) -> str | None:
    """A launcher installed next to this python (the venv's), else on PATH."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name)


ACCELERATE, TORCHRUN = tool("accelerate"), tool("torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str, *options: str) -> list[str]:
    """`accelerate launch --config_file launch/<config> --main_process_port <free port> OPTIONS`; the script and
    its arguments follow."""
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        str(REPO / "launch" / config),
        "--main_process_port",
        str(free_port()),
        *options,
    ]


def torchrun(nproc: int) -> list[str]:
    """`torchrun --nproc_per_node N` on a free local port; the script and its arguments follow."""
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def launch_command(processes: int = 1, launcher: str = "accelerate", script: str = "distcifar/train.py") -> list[str]:
    """`script` (relative to the repository) as users start it: plain python, `accelerate launch` with
    launch/cpu.yaml for 1 process, or launch/cpu_multi.yaml with --num_processes N."""
    if launcher == "python":
        return [sys.executable, script]
    if processes == 1:
        return [ACCELERATE, "launch", "--config_file", "launch/cpu.yaml", script]
    return [*accelerate_launch("cpu_multi.yaml", "--num_processes", str(processes)), script]


def train_args(output_dir: Path, data: Path, *extra: str) -> list[str]:
    """A tiny, fast run of train.py on `data`: 256 images, batch 32, 2 epochs."""
    return [
        "--output_dir",
        str(output_dir),
        "--data.path",
        str(data),
        *TINY_MODEL,
        "--train.epochs",
        "2",
        "--train.batch_size",
        "32",
        "--train.eval_batch_size",
        "50",
        "--train.log_every",
        "1",
        "--tracking.report_to",
        "none",
        "--tracking.plots",  # a plot after every evaluation is a background process competing for the cores
        "false",
        "--optim.name",
        "adam",
        "--optim.lr",
        "0.003",
        "--optim.schedule",
        "cosine",
        "--optim.warmup_epochs",
        "0.5",
        *extra,
    ]


def run(command: list[str], timeout: float = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command in the repository to its end; with check, a non-zero exit fails the test with its output."""
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{command} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
        )
    return result


def start(command: list[str], env: dict | None = None, separate_stderr: bool = False) -> subprocess.Popen:
    """Start a launch in the repository without waiting: in a session of its own (so a signal to its process
    group reaches every process of the job, as scancel and Ctrl-C do), output piped as text, stderr into
    stdout unless separate_stderr."""
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for a launch started with separate_stderr: (exit code, stdout, stderr). One still running after
    `timeout` seconds is killed, workers included, and the kill noted at the end of stderr."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(
            process.pid
        )  # the launcher and its workers (torch's elastic agent starts them in sessions of their own)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)  # and whatever is left in the launcher's own process group
        out, err = process.communicate()
        err += f"\n[test] killed after {timeout} s"
    return process.returncode, out, err


def worker_exit_codes(launcher_output: str) -> dict[int, int]:
    """{rank: exit code} of the workers that failed, from the report torch's elastic launcher (under accelerate
    launch and torchrun) prints when a worker fails: its record of each worker process. A worker it killed itself
    after another had failed shows as -15."""
    import re

    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", launcher_output)
    return {int(rank): int(code) for rank, code in found}


def kill_tree(pid: int, signum: int = 9) -> None:
    """Signal a process and all its descendants: torch's elastic launcher starts its workers in
    sessions of their own, so killing the launcher's process group would leave them running."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def process_with_env(candidates, **env: str):
    """The first of `candidates` (psutil processes) whose environment holds every NAME=VALUE of `env`, or None."""
    import psutil

    for process in candidates:
        with contextlib.suppress(psutil.Error):
            environment = process.environ()
            if all(environment.get(name) == value for name, value in env.items()):
                return process
    return None


def sigkill_rank_after(process: subprocess.Popen, checkpoint: Path, rank: int, delay_s: float, timeout: float = 300):
    """Once `checkpoint` (a step folder) is complete, wait `delay_s` and SIGKILL the launched worker of `rank`, as an
    OOM kill or a segfault would end it; that worker's pid."""
    import psutil

    deadline = time.monotonic() + timeout
    while not (checkpoint / "manifest.json").exists():
        assert process.poll() is None, f"the run ended before {checkpoint.name}"
        assert time.monotonic() < deadline, f"no {checkpoint.name} after {timeout} s"
        time.sleep(0.02)
    time.sleep(delay_s)
    worker = process_with_env(psutil.Process(process.pid).children(recursive=True), RANK=str(rank))
    assert worker is not None, f"no worker of rank {rank} under the launcher"
    worker.send_signal(9)
    return worker.pid


def probe_accelerator(output_dir: str, timeout_s: int = 120):
    """For the probes: the Accelerator train.py would build (runtime.build_accelerator, its own WORLD_SIZE check
    included), fp32, no tracker, with `timeout_s` as the collective timeout."""
    from distcifar.accelerator import build_accelerator
    from distcifar.config import Config

    cfg = Config()
    cfg.output_dir = output_dir
    cfg.tracking.report_to = "none"
    cfg.train.mixed_precision = "no"
    cfg.train.collective_timeout_s = timeout_s
    return build_accelerator(cfg)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def slurm_answers() -> bool:
    """A Slurm cluster is up: sbatch/srun are installed and sinfo answers."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# An offline W&B run's run-<id>.wandb file: a LevelDB-style log of protobuf Records.
LOG_BLOCK_SIZE = 32768
LOG_HEADER = struct.Struct("<IHB")  # crc32c, payload length, chunk type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """All protobuf Records of a run-<id>.wandb file, in write order."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, position = [], b"", 7  # after the file header ":W&B", magic (2 bytes), version
    while position + LOG_HEADER.size <= len(data):
        left_in_block = LOG_BLOCK_SIZE - position % LOG_BLOCK_SIZE
        if left_in_block < LOG_HEADER.size:  # too short for a chunk header: zero padding
            position += left_in_block
            continue
        _, length, chunk_type = LOG_HEADER.unpack_from(data, position)
        if chunk_type == 0:  # zero padding up to the end of the block
            position += left_in_block
            continue
        payload = data[position + LOG_HEADER.size : position + LOG_HEADER.size + length]
        position += LOG_HEADER.size + length
        pending = payload if chunk_type in (FULL, FIRST) else pending + payload
        if chunk_type in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def read_wandb_records_so_far(run_file: Path) -> list:
    """The records of a run file that a kill may have cut off mid-record (then none: the framing cannot be
    trusted)."""
    from google.protobuf.message import DecodeError

    try:
        return read_wandb_records(run_file)
    except DecodeError:
        return []


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_file: Path, wait_s: float = 0.0) -> dict:
    """The run id, history rows by step, summary updates, config keys, metric definitions (by name or
    glob) and exit code of one offline run; waits up to wait_s for its exit record (see offline_runs)."""
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            run = _read_offline_run(run_file)
        except DecodeError:  # a record cut off mid-write
            run = {"exit_code": None}
        if run["exit_code"] is not None or time.monotonic() > deadline:
            return run
        time.sleep(0.1)


def _read_offline_run(run_file: Path) -> dict:
    run = {"id": None, "init": {}, "history": {}, "summary": {}, "config": set(), "metrics": {}, "exit_code": None}
    for record in read_wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["init"] = {
                "project": record.run.project,
                "name": record.run.display_name,
                "group": record.run.run_group,
                "tags": list(record.run.tags),
            }
        elif kind == "history":
            row = run["history"].setdefault(record.history.step.num, {})
            row.update({_item_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            run["summary"].update({_item_key(item): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "config":
            run["config"].update(_item_key(item) for item in record.config.update)
        elif kind == "metric":
            run["metrics"][record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def offline_runs(output_dir: Path, count: int, timeout_s: float = 20.0) -> list[dict]:
    """The `count` offline runs under output_dir, oldest first (by the first step each one logged).

    wandb-core writes the file in the background and can return from run.finish() before it is
    all on disk, so wait until every run ends with its exit record.
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout_s
    while True:
        paths = sorted(output_dir.glob("wandb/offline-run-*/run-*.wandb"))
        try:
            runs = [read_offline_run(path) for path in paths]
        except DecodeError:  # a record cut off mid-write
            runs = []
        if len(runs) == count and all(run["exit_code"] is not None for run in runs):
            return sorted(runs, key=lambda run: min(run["history"], default=0))
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} finished offline runs in {output_dir}, found {len(paths)} files")
        time.sleep(0.1)
