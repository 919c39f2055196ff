"""The benchmark runs end to end (--quick: tiny model, few steps) and writes every figure it promises.

No speed assertions: speed is what the benchmark reports, not something a test can hold it to.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

POSITIVE = [
    "bare_images_per_second", "loop_images_per_second", "data_images_per_second", "data_batches_per_second",
    "loop_vs_bare_ratio", "data_vs_step_ratio", "checkpoint_save_seconds", "checkpoint_load_seconds",
    "startup_seconds", "first_step_seconds", "launch_to_first_step_seconds",
    "num_threads", "batch_size", "repetitions",
]


def test_quick_benchmark_writes_all_figures(tmp_path):
    output, scratch = tmp_path / "bench.json", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TMPDIR": str(scratch)}
    result = subprocess.run(
        [sys.executable, "-m", "distcifar.benchmark", "--quick", "--output", str(output)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(output.read_text())

    for key in POSITIVE:
        assert isinstance(figures[key], (int, float)) and math.isfinite(figures[key]) and figures[key] > 0, (key, figures[key])
    assert figures["device"].split(":")[0] in ("cpu", "cuda")
    assert figures["device_name"]
    assert figures["mixed_precision"] in ("no", "bf16", "fp16")
    assert isinstance(figures["channels_last"], bool)
    assert figures["quick"] is True
    assert len(figures["runs"]["bare"]) == len(figures["runs"]["loop"]) == figures["repetitions"]
    assert "loop / bare" in result.stdout  # the table is printed
    left = list(scratch.glob("distcifar-bench-*"))  # (torch may leave caches of its own in TMPDIR)
    assert not left, f"the benchmark's temporary folder (tracker files, checkpoints) was left behind: {left}"
