"""Tracking through real processes: a train.py run killed before its first checkpoint continues its W&B run
(offline, read back from its .wandb files), and the plot command. The in-process tracking tests are in
tests/unit/test_tracking.py."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

from distcifar import plot
from distcifar.tracking import RUN_ID_FILE
from support import (
    kill_tree,
    launch_command,
    read_offline_run,
    read_wandb_records_so_far,
    run,
    start,
    train_args,
    write_parquet_dataset,
)

pytestmark = pytest.mark.usefixtures("isolated_wandb_env")  # no W&B settings of the machine; HOME under tmp_path


def test_a_train_py_run_killed_before_its_first_checkpoint_continues_its_wandb_run(
    tmp_path, offline_wandb, monkeypatch
):
    # one epoch of 1024 images in batches of 8: the first checkpoint is due at step 128, the run's end
    data = write_parquet_dataset(tmp_path / "data", train_rows=1024)
    out = tmp_path / "run"
    command = launch_command(1, launcher="python") + train_args(
        out, data, "--tracking.report_to", "wandb", "--train.epochs", "1", "--train.batch_size", "8"
    )
    process = start(command)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():  # a step is logged
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no step logged in time"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGSTOP)  # train.py holds still; wandb-core goes on writing its file
    assert not list(out.glob("checkpoints/step_*")), "stopped too late: a checkpoint was saved"
    while not any(
        record.WhichOneof("record_type") == "run"
        for path in out.glob("wandb/offline-run-*/run-*.wandb")
        for record in read_wandb_records_so_far(path)
    ):
        assert time.monotonic() < deadline, "no W&B run record in time"
        time.sleep(0.05)
    kill_tree(process.pid, signal.SIGKILL)  # train.py and wandb-core
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL and not list(out.glob("checkpoints/step_*"))
    (killed_file,) = out.glob("wandb/offline-run-*/run-*.wandb")

    result = run(command)  # the same command again: no checkpoint to resume from
    assert "resumed" not in result.stdout
    run_id = json.loads((out / "summary.json").read_text())["tracker_run_id"]
    assert (out / RUN_ID_FILE).read_text().strip() == run_id
    killed = [
        record.run.run_id
        for record in read_wandb_records_so_far(killed_file)
        if record.WhichOneof("record_type") == "run"
    ]
    assert killed == [run_id]
    assert sorted(path.name for path in out.glob("wandb/offline-run-*/run-*.wandb")) == [f"run-{run_id}.wandb"] * 2
    (finished_file,) = set(out.glob("wandb/offline-run-*/run-*.wandb")) - {killed_file}
    finished = read_offline_run(finished_file, wait_s=20)
    assert finished["id"] == run_id and finished["exit_code"] == 0

    # train.py's rows are namespaced alike in W&B and metrics.jsonl, and the plots find them
    assert {"step", "train/epoch", "train/loss", "train/lr", "train/grad_norm", "train/images_per_second"} <= set(
        finished["history"][10]
    )
    evaluation = finished["history"][128]
    assert {"eval/accuracy", "eval/loss", "eval/num_samples", "eval/class_acc/cat", "train/epoch_seconds"} <= set(
        evaluation
    )
    assert evaluation["eval/num_samples"] == 101
    assert finished["summary"]["eval/accuracy"] == {"max": evaluation["eval/accuracy"]}
    drawn = {}
    monkeypatch.setattr(plot, "_save", lambda fig, path: drawn.__setitem__(Path(path).name, fig))
    plot.redraw(out)
    loss_ax, accuracy_ax, lr_ax = drawn[plot.CURVES_PNG].axes[:3]
    labels = sorted(line.get_label() for line in loss_ax.lines)  # the default label smoothing, 0.1: its floor too
    assert labels == ["eval", "lowest training loss (label smoothing 0.1)", "train"]
    assert [line.get_label() for line in accuracy_ax.lines] == ["eval"] and len(lr_ax.lines) == 1
    assert len(lr_ax.lines[0].get_xydata()) == 128  # steps 1-128, the killed attempt's replaced


def run_plot_cli(*args: str):
    return run([sys.executable, "-m", "distcifar.plot", *args], timeout=60, check=False)


def test_plot_cli_redraws_and_rejects_bad_folders(tmp_path):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": step, "train/loss": 1 / step, "train/lr": 0.1}) + "\n" for step in range(1, 20))
        + json.dumps({"step": 19, "eval/accuracy": 0.4, "eval/loss": 1.2})
        + "\n"
    )
    plot.write_confusion(output_dir, [[5, 1], [2, 7]], ["cat", "dog"], step=19, epoch=1, split="val")

    result = run_plot_cli(str(output_dir))
    assert result.returncode == 0, result.stderr
    for name in ("curves.png", "confusion.png"):
        assert matplotlib.image.imread(output_dir / name).ndim == 3

    for bad_dir in (tmp_path / "missing", tmp_path):  # no folder; a folder without metrics.jsonl
        result = run_plot_cli(str(bad_dir))
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:"), result.stderr
