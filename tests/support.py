"""Helpers the tests share: the repository, a learnable synthetic dataset in the hub's schema, the tiny
network, real launches of train.py, and readers of what a run leaves behind (metrics, W&B files, Slurm)."""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from distcifar.config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# A network small enough for CPU tests that are about the loop, not the seed network's accuracy.
TINY_MODEL_CONFIG = ModelConfig(block_channels=[8, 8, 16, 16, 24, 24], classifier_hidden=[32])
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int = 1, launcher: str = "accelerate", script: str = "distcifar/train.py") -> list[str]:
    bin_dir = Path(sys.executable).parent
    if launcher == "python":
        return [sys.executable, script]
    if processes == 1:
        return [str(bin_dir / "accelerate"), "launch", "--config_file", "launch/cpu.yaml", script]
    return [
        str(bin_dir / "accelerate"),
        "launch",
        "--config_file",
        "launch/cpu_multi.yaml",
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        script,
    ]


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
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{command} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
        )
    return result


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
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


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
