"""The repository, the tiny network and run settings the tests share, and the metrics a run leaves behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the repository: the one definition the tests and probes use
if str(REPO) not in sys.path:  # a probe run by a launcher imports distcifar from here, installed or not
    sys.path.insert(0, str(REPO))

from distcifar.config import ModelConfig  # noqa: E402

TRAIN = REPO / "distcifar" / "train.py"
PROBES = REPO / "tests" / "probes"
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# A network small enough for CPU tests that are about the loop, not the seed network's accuracy.
TINY_MODEL_CONFIG = ModelConfig(block_channels=[8, 8, 16, 16, 24, 24], classifier_hidden=[32])

# The restart experiment (tests/launch/test_restarts.py, scripts/restart_trials.py): 8 steps an epoch, 32 in all, a
# checkpoint every 3 steps; fp32 whatever the CPU, so that runs compare bit for bit
RESTART_ARGS = ("--train.epochs", "4", "--checkpoint.every_steps", "3", "--train.mixed_precision", "no")
RESTART_TOTAL_STEPS = 32
TINY_MODEL = ["--model.block_channels", "[8,8,16,16,24,24]", "--model.classifier_hidden", "[32]"]


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
