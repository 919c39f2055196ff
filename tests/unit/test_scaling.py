"""scripts/scaling.py in the pytest process: gradient bytes per comm hook, the scaling model by hand, a prediction
from a given step time, and its option checks and the benchmark's. The sweep over 1 and 2 processes, and the
benchmark's own runs, are in tests/launch/test_benchmark.py."""

from __future__ import annotations

import importlib
import json
import sys

import pytest
import torch

from support import REPO


@pytest.fixture(scope="module")
def scaling():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module("scaling")
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_gradient_bytes_of_the_seed_network_and_of_each_comm_hook(scaling):
    from distcifar.config import ModelConfig
    from distcifar.model import DistCifarNet

    gradient_bytes = scaling.gradient_bytes

    seed = list(DistCifarNet(ModelConfig()).parameters())
    assert gradient_bytes(seed) == sum(p.numel() for p in seed) * 4 == 46_633_188  # the 46.6 MB
    assert gradient_bytes(seed, "fp16") == gradient_bytes(seed, "bf16") == 46_633_188 // 2
    linear = list(torch.nn.Linear(100, 50).parameters())  # weight 50 x 100, bias 50
    # PowerSGD: P (50 x r) and Q (100 x r) instead of 5000 numbers; the bias whole
    assert gradient_bytes(linear, "powersgd", powersgd_rank=1) == (150 + 50) * 4
    assert gradient_bytes(linear, "powersgd", powersgd_rank=16) == (150 * 16 + 50) * 4
    # not worth compressing (2 x (50+100) x 17 > 5000): sent whole
    assert gradient_bytes(linear, "powersgd", powersgd_rank=17) == (5000 + 50) * 4
    assert gradient_bytes(linear, "batched_powersgd", powersgd_rank=1) == 2 * 72 * 4  # ceil(sqrt(5050)) = 72


def test_scaling_model_by_hand(scaling):
    predict, ring_bytes = scaling.predict, scaling.ring_bytes

    assert ring_bytes(46.6e6, 2) == 46.6e6 and ring_bytes(46.6e6, 8) == 2 * 7 / 8 * 46.6e6
    alone = predict(0.01, 46.6e6, 1, 12.5)
    assert alone.comm_seconds == 0 and alone.efficiency == 1 and alone.accumulation_for_target == 1
    # the example: 93 MB per GPU over 100 Gb/s is ~7.5 ms; 1 ms of compute per step
    p = predict(0.001, 46.6e6, 1000, 12.5)
    assert p.comm_seconds == pytest.approx(2 * 999 / 1000 * 46.6e6 / 12.5e9) and 7.4e-3 < p.comm_seconds < 7.5e-3
    assert p.efficiency == pytest.approx(0.001 / (0.001 + p.comm_seconds))
    assert p.communication_share == pytest.approx(1 - p.efficiency)
    # the smallest accumulation k with t_comm / (k t_compute + t_comm) <= 20%
    k = p.accumulation_for_target
    assert p.comm_seconds / (k * 0.001 + p.comm_seconds) <= 0.2 < p.comm_seconds / ((k - 1) * 0.001 + p.comm_seconds)
    # a latency per bucket and ring step: 2 (N-1) x buckets x latency on top
    q = predict(0.001, 46.6e6, 8, 12.5, latency_s=1e-5, bucket_bytes=25 * 2**20)
    assert q.comm_seconds == pytest.approx(predict(0.001, 46.6e6, 8, 12.5).comm_seconds + 2 * 7 * 2 * 1e-5)


def test_prediction_from_a_given_step_time_needs_no_measurement(scaling, tmp_path, capsys):
    output = tmp_path / "predict.json"
    result = scaling.main(
        [
            "--step_seconds",
            "0.001",
            "--predict",
            "2,16",
            "--bandwidth",
            "ib-ndr,eth-25g",
            "--ddp.comm_hook",
            "fp16",
            "--output",
            str(output),
        ]
    )
    assert json.loads(output.read_text()) == json.loads(json.dumps(result))
    assert result["gradient_megabytes"] == pytest.approx(46.633188 / 2)
    rows = {(row["link"], row["processes"]): row for row in result["prediction"]}
    assert set(rows) == {("ib-ndr", 2), ("ib-ndr", 16), ("eth-25g", 2), ("eth-25g", 16)}
    assert rows["eth-25g", 16]["efficiency"] < rows["ib-ndr", 16]["efficiency"] < rows["ib-ndr", 2]["efficiency"] < 1
    assert "accumulation for <= 20%" in capsys.readouterr().out


@pytest.mark.parametrize(
    "program, argv, message",
    [
        ("scaling", ["--predict", "0"], "--predict takes process counts >= 1"),
        (
            "scaling",
            ["--predict", "2", "--bandwidth", "carrier-pigeon"],
            "--bandwidth: a bandwidth is a number of GB/s or one of nvlink",
        ),
        ("scaling", ["--step_seconds", "0.01"], "--step_seconds needs a value > 0 and --predict"),
        ("scaling", ["--processes", "1,2", "--baseline", "x.json"], "--processes measures its own baseline"),
        (
            "scaling",
            ["--processes", "1,2,3", "--train.batch_size", "128"],
            "train.batch_size 128 does not split over [3] processes",
        ),
        ("benchmark", ["--ddp.powersgd_start_step", "1"], "ddp.powersgd_start_step must be >= 2"),
        ("benchmark", ["--ddp.bucket_cap_mb", "0"], "ddp.bucket_cap_mb must be > 0"),
        ("benchmark", ["--ddp.comm_hook", "int8"], "ddp.comm_hook"),
        ("scaling", ["--step_seconds", "0.01", "--predict", "2", "--ddp.comm_hook", "int8"], "ddp.comm_hook"),
    ],
)
def test_scaling_and_benchmark_options_are_checked(scaling, program, argv, message, capsys):
    from distcifar import benchmark

    with pytest.raises(SystemExit) as exit_info:
        (scaling if program == "scaling" else benchmark).main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_baseline_of_another_config_is_refused(tmp_path, capsys, fresh_accelerate_state):
    from distcifar import benchmark

    other = tmp_path / "one.json"
    other.write_text(json.dumps({"num_processes": 1, "batch_size": 64, "loop_images_per_second": 10.0}))
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--quick", "--baseline", str(other), "--output", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--baseline must be a one-process run of the same config" in err and "batch_size 64 (here 32)" in err
    assert not (tmp_path / "x.json").exists()
