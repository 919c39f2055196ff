"""The benchmark runs end to end (--quick: tiny model, few steps) and writes every figure it promises, with one
process and, through scripts/scaling.py, with two (the scaling figures and the model's). The scaling model and the
option checks, in the pytest process, are in tests/unit/test_scaling.py.

No speed assertions: speed is what the benchmark reports, not something a test can hold it to.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys

from support import run

POSITIVE = [
    "bare_images_per_second",
    "loop_images_per_second",
    "data_images_per_second",
    "data_batches_per_second",
    "loop_vs_bare_ratio",
    "data_vs_step_ratio",
    "checkpoint_save_seconds",
    "checkpoint_load_seconds",
    "startup_seconds",
    "first_step_seconds",
    "launch_to_first_step_seconds",
    "num_threads",
    "batch_size",
    "repetitions",
    "train_flops_per_image",
    "bare_tflops",
    "loop_tflops",
    "peak_tflops",
    "bare_mfu",
    "loop_mfu",
    "peak_memory_gb",
]


def test_quick_benchmark_writes_all_figures(tmp_path):
    output, scratch = tmp_path / "bench.json", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TMPDIR": str(scratch)}
    result = run(
        [sys.executable, "-m", "distcifar.benchmark", "--quick", "--output", str(output)], env=env, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(output.read_text())

    for key in POSITIVE:
        assert isinstance(figures[key], (int, float)) and math.isfinite(figures[key]) and figures[key] > 0, (
            key,
            figures[key],
        )
    assert figures["device"].split(":")[0] in ("cpu", "cuda")
    assert figures["device_name"]
    assert figures["mixed_precision"] in ("no", "bf16", "fp16")
    assert isinstance(figures["channels_last"], bool)
    assert figures["quick"] is True
    assert len(figures["runs"]["bare"]) == len(figures["runs"]["loop"]) == figures["repetitions"]
    assert "loop / bare" in result.stdout  # the table is printed
    # utilisation: FlopCounterMode's count (tests/unit/test_utilization.py checks it against the hand count), the
    # steps' TFLOP/s from their images/s, and on a CPU each run's share of the matmul peak timed in turns with it
    from distcifar.config import ModelConfig
    from distcifar.utilization import train_flops_per_image

    tiny = ModelConfig(block_channels=[8, 8, 16, 16, 32, 32], classifier_hidden=[32])  # --quick's network
    assert figures["train_flops_per_image"] == train_flops_per_image(tiny)
    runs = figures["runs"]
    for name in ("bare", "loop"):
        tflops = figures[f"{name}_images_per_second"] * figures["train_flops_per_image"] / 1e12
        assert figures[f"{name}_tflops"] == tflops
        if figures["device"] == "cpu":
            assert len(runs["peak"]) == figures["repetitions"] and figures["peak_tflops"] == statistics.median(
                runs["peak"]
            )
            paired = [
                ips * figures["train_flops_per_image"] / 1e12 / peak for ips, peak in zip(runs[name], runs["peak"])
            ]
            assert runs[f"{name}_mfu"] == paired and figures[f"{name}_mfu"] == statistics.median(paired)
    assert "6. training FLOPs per image" in result.stdout and "utilisation of 2." in result.stdout
    left = list(scratch.glob("distcifar-bench-*"))  # (torch may leave caches of its own in TMPDIR)
    assert not left, f"the benchmark's temporary folder (tracker files, checkpoints) was left behind: {left}"


# ---------------------------------------------------------------------------------------------
# Scaling: the 2-process figures, and the model of scripts/scaling.py


def test_two_processes_report_total_throughput_communication_share_and_efficiency(tmp_path):
    """scripts/scaling.py --processes 2: a one-process run, then a real 2-process DDP run (gloo) with --baseline of
    it, and the gradient's all-reduce timed alone on 2 processes."""
    output, scratch = tmp_path / "scaling.json", tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TMPDIR": str(scratch)}
    result = run(
        [
            sys.executable,
            "scripts/scaling.py",
            "--quick",
            "--processes",
            "2",
            "--predict",
            "2,8",
            "--bandwidth",
            "nvlink,12.5",
            "--output",
            str(output),
        ],
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    combined = json.loads(output.read_text())
    one, two = combined["runs"]["1"], combined["runs"]["2"]
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    # one process: no DDP, so nothing to compare with and nothing communicated
    assert one["communication_share"] is None and one["nosync_images_per_second"] is None
    assert one["total_images_per_second"] == one["loop_images_per_second"]
    # two processes: every figure of the issue, as numbers
    assert len(two["rank_images_per_second"]) == 2
    assert two["total_images_per_second"] == sum(two["rank_images_per_second"])
    assert two["nosync_skips_all_reduce"] is True  # the ranks drifted apart in a no-sync step
    assert two["nosync_images_per_second"] > 0 and len(two["runs"]["nosync"]) == two["repetitions"]
    # the share is 1 - t_nosync / t_sync paired run by run, then the median; its size is a timing, which a loaded
    # machine (the other test worker) can push anywhere, so it is measured in results/, not bounded here
    paired = [1 - loop / nosync for loop, nosync in zip(two["runs"]["loop"], two["runs"]["nosync"], strict=True)]
    assert two["runs"]["communication_share"] == paired and len(paired) == two["repetitions"]
    assert two["communication_share"] == statistics.median(paired)
    params = two["model_parameters"]
    assert two["gradient_megabytes"] == params * 4 / 1e6  # fp32 gradients, no comm hook
    assert two["allreduce_megabytes_per_process"] == params * 4 / 1e6  # 2 (N-1)/N = 1 for N = 2
    assert two["allreduce_seconds"] > 0 and two["link_gbps"] > 0 and 0 < two["predicted_communication_share"] < 1
    assert two["baseline_images_per_second"] == one["loop_images_per_second"]
    assert two["speedup"] == two["total_images_per_second"] / one["loop_images_per_second"]
    assert two["scaling_efficiency"] == two["speedup"] / 2
    assert combined["prediction"] == two["prediction"]  # from the largest run's step time
    assert [(row["link"], row["processes"]) for row in two["prediction"]] == [
        ("nvlink", 2),
        ("nvlink", 8),
        ("12.5 GB/s", 2),
        ("12.5 GB/s", 8),
    ]
    assert [row["processes"] for row in combined["table"]] == [1, 2]
    assert combined["table"][1]["speedup"] == two["speedup"]
    assert "communication share" in result.stdout and "scaling: the same config" in result.stdout
    assert not list(scratch.glob("distcifar-*")), "temporary folders were left behind"
