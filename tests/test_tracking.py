"""Tracking: real W&B in offline mode (read back from its .wandb files), metrics.jsonl, PNG plots.

An offline run writes everything it would upload to OUTPUT_DIR/wandb/offline-run-*/run-<id>.wandb:
protobuf `Record`s in LevelDB's log framing (what `wandb sync` reads). wandb 0.31 ships no
Python reader for it any more, so `support.read_wandb_records` decodes the framing itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from google.protobuf.message import DecodeError

from distcifar import plot
from distcifar.config import Config, ModelConfig, TrackingConfig
from distcifar.model import DistCifarNet
from distcifar.tracking import RUN_ID_FILE, Tracker, report_to
from support import kill_tree, launch_command, read_metrics, read_wandb_records, run, train_args, write_parquet_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
HARDWARE = {"device": "cpu", "num_processes": 1, "mixed_precision": "no"}


# ---------------------------------------------------------------------------------------------
# Reading an offline W&B run


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_file: Path, wait_s: float = 0.0) -> dict:
    """The run id, history rows by step, summary updates, config keys, metric definitions (by name or
    glob) and exit code of one offline run; waits up to wait_s for its exit record (see offline_runs)."""
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


# ---------------------------------------------------------------------------------------------
# Fixtures and a fake training loop


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """No W&B credentials or mode from the machine; HOME and W&B's own folders under tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in (
        "WANDB_MODE",
        "WANDB_API_KEY",
        "WANDB_BASE_URL",
        "NETRC",
        "WANDB_ENTITY",
        "WANDB_PROJECT",
        "WANDB_RUN_ID",
        "WANDB_NAME",
        "WANDB_RUN_GROUP",
        "WANDB_TAGS",
        "WANDB_RESUME",
        "WANDB_DIR",
    ):
        monkeypatch.delenv(name, raising=False)  # runs go to OUTPUT_DIR/wandb unless a test sets WANDB_DIR
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's captured stdout/stderr unwrapped
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    if "wandb" in sys.modules:  # wandb caches its settings (the mode too) process-wide until teardown
        sys.modules["wandb"].teardown()


@pytest.fixture
def offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")


def make_config(report: str, plots: bool = True) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(
        block_convs=[1, 2], block_channels=[12, 24], block_halve=[False, True], classifier_hidden=[16]
    )
    cfg.tracking.report_to = report
    cfg.tracking.plots = plots
    return cfg


def make_tracker(cfg: Config, output_dir: Path, run_id: str | None = None) -> Tracker:
    tracker_name = report_to(cfg.tracking)
    accelerator = Accelerator(cpu=True, log_with=None if tracker_name == "none" else [tracker_name])
    return Tracker(accelerator, cfg, output_dir, run_id, HARDWARE)


def train_and_evaluate(tracker: Tracker, model: DistCifarNet, steps: list[int], epoch: int) -> None:
    """Log train metrics at `steps`, then an evaluation at the last of them."""
    for step in steps:
        tracker.log(
            {
                "train/epoch": epoch,
                "train/loss": 2.0 / step**0.5,
                "train/lr": 0.1,
                "train/grad_norm": 1.5,
                "train/images_per_second": 1000.0,
                "train/images_per_second_per_process": 1000.0,
            },
            step,
        )
    generator = torch.Generator().manual_seed(epoch)
    confusion = (
        torch.eye(10, dtype=torch.long) * 50 * epoch + torch.randint(0, 10, (10, 10), generator=generator)
    ).tolist()
    correct = sum(confusion[i][i] for i in range(10))
    total = sum(map(sum, confusion))
    result = {
        "epoch": epoch,
        "eval_accuracy": correct / total,
        "eval_loss": 1.0 / epoch,
        "eval_samples": total,
        "per_class_accuracy": [confusion[i][i] / sum(confusion[i]) for i in range(10)],
        "confusion": confusion,
        "eval_split": "test",
        "train_seconds": 2.5 * epoch,
    }
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)
    tracker.log_eval(result, steps[-1], model, images, labels)


@pytest.fixture
def model() -> DistCifarNet:
    torch.manual_seed(0)
    return DistCifarNet(make_config("none").model).train()


# ---------------------------------------------------------------------------------------------
# Tests


def test_offline_wandb_run_holds_history_summary_and_id(tmp_path, offline_wandb, model):
    output_dir = tmp_path / "run"
    tracker = make_tracker(make_config("wandb", plots=False), output_dir, run_id="given0id")
    assert tracker.report_to == "wandb" and tracker.run_id == "given0id"
    train_and_evaluate(tracker, model, steps=[10, 20], epoch=1)
    tracker.finish(summary={"best_eval_accuracy": 0.5})
    tracker.finish()  # idempotent
    assert model.training, "log_eval must put the model back in training mode"

    (run,) = offline_runs(output_dir, count=1)
    assert run["id"] == "given0id"
    assert set(run["history"]) == {10, 20}
    for step in (10, 20):
        assert run["history"][step]["step"] == step
        assert {"train/loss", "train/lr", "train/grad_norm", "train/epoch"} <= set(run["history"][step])
    evaluation = run["history"][20]
    assert 0 < evaluation["eval/accuracy"] <= 1
    assert {
        "eval/loss",
        "eval/num_samples",
        "eval/class_acc/cat",
        "experts/block1/conv0",
        "experts/block1/conv1",
    } <= set(evaluation)
    assert evaluation["experts/block0/conv0"] == pytest.approx(1.0)  # a one-conv block: softmax over one
    assert evaluation["experts/block1/conv0"] + evaluation["experts/block1/conv1"] == pytest.approx(1.0)
    # Media are nested values; read_offline_run joins their keys with "/".
    assert evaluation["eval/samples/_type"] == "images/separated" and evaluation["eval/samples/count"] == 8
    assert evaluation["eval/samples/captions"][0].startswith("pred: ")
    assert evaluation["eval/confusion_matrix_table/nrows"] == 100  # (true, predicted, count) for 10 x 10 classes
    assert evaluation["experts/block1/weights/_type"] == "histogram"
    assert run["summary"]["best_eval_accuracy"] == 0.5
    assert {"train.batch_size", "optim.lr", "device", "num_processes", "git_commit"} <= run["config"]
    assert run["exit_code"] == 0

    rows = read_metrics(output_dir)
    assert [row["step"] for row in rows] == [10, 20, 20]
    assert rows[-1]["eval/accuracy"] == evaluation["eval/accuracy"]
    # metrics.jsonl and W&B hold the same keys and numbers; W&B adds only its own (_step, ...) and the media
    for step in (10, 20):
        logged = {key: value for row in rows if row["step"] == step for key, value in row.items()}
        scalars = {
            key: value
            for key, value in run["history"][step].items()
            if not key.startswith("_")
            and not re.match(r"(eval/samples|eval/confusion_matrix\w*|experts/block\d+/weights)/", key)
        }
        assert scalars == logged
    confusion = json.loads((output_dir / "confusion.json").read_text())
    assert confusion["step"] == 20 and confusion["classes"][3] == "cat"


def test_wandb_charts_against_the_step_and_keeps_the_best_eval_accuracy(tmp_path, offline_wandb, model):
    output_dir = tmp_path / "run"
    tracker = make_tracker(make_config("wandb", plots=False), output_dir)
    train_and_evaluate(tracker, model, steps=[10, 20], epoch=3)
    train_and_evaluate(tracker, model, steps=[30, 40], epoch=1)  # a worse second evaluation
    tracker.finish()

    (run,) = offline_runs(output_dir, count=1)
    metrics = run["metrics"]
    assert metrics["step"].step_metric == ""  # the x axis itself
    assert metrics["*"].step_metric == "step"  # every other key is charted against it
    assert metrics["eval/accuracy"].step_metric == "step" and metrics["eval/accuracy"].summary.max
    assert metrics["eval/loss"].step_metric == "step" and metrics["eval/loss"].summary.min
    accuracies = [run["history"][step]["eval/accuracy"] for step in (20, 40)]
    losses = [run["history"][step]["eval/loss"] for step in (20, 40)]
    assert accuracies[0] > accuracies[1] and losses[0] < losses[1]
    assert run["summary"]["eval/accuracy"] == {"max": accuracies[0]}
    assert run["summary"]["eval/loss"] == {"min": losses[0]}
    assert run["summary"]["train/loss"] == run["history"][40]["train/loss"]  # the last value, as by default
    assert all(run["history"][step]["step"] == step for step in (10, 20, 30, 40))


def test_resumed_run_keeps_the_id_and_steps_continue(tmp_path, offline_wandb, model):
    output_dir = tmp_path / "run"
    first = make_tracker(make_config("wandb", plots=False), output_dir)  # no id yet: the tracker makes one
    train_and_evaluate(first, model, steps=[10, 20], epoch=1)
    first.finish(exit_code=1)  # e.g. preempted
    run_id = first.run_id

    second = make_tracker(
        make_config("wandb", plots=False), output_dir, run_id=run_id
    )  # id read back from the checkpoint
    assert second.run_id == run_id
    train_and_evaluate(second, model, steps=[30, 40], epoch=2)
    second.finish()

    # Offline, each attempt gets its own folder; `wandb sync` appends both to the one run.
    before, after = offline_runs(output_dir, count=2)
    assert before["id"] == after["id"] == run_id
    assert sorted(before["history"]) == [10, 20] and sorted(after["history"]) == [30, 40]
    assert (before["exit_code"], after["exit_code"]) == (1, 0)
    assert [row["step"] for row in read_metrics(output_dir)] == [10, 20, 20, 30, 40, 40]


def test_the_run_id_is_kept_in_the_output_folder_from_the_start(tmp_path, offline_wandb, model, monkeypatch, capsys):
    output_dir, id_file = tmp_path / "run", tmp_path / "run" / RUN_ID_FILE

    def started(cfg: Config, run_id: str | None = None) -> str:
        tracker = make_tracker(cfg, output_dir, run_id)
        tracker.finish()
        return tracker.run_id

    started(make_config("none", plots=False))
    assert not id_file.exists()  # only W&B runs have ids to keep
    cfg = make_config("wandb", plots=False)
    first = make_tracker(cfg, output_dir)  # a new run: a new id, in the folder before any step
    assert id_file.read_text().strip() == first.run_id
    first.finish()
    assert started(cfg) == first.run_id  # no checkpoint yet: the folder's id

    # the folder's id beats WANDB_RUN_ID (both stand for "continue"), with one line saying so
    monkeypatch.setenv("WANDB_RUN_ID", "envid0001")
    capsys.readouterr()
    second = make_tracker(cfg, output_dir)
    assert second.run_id == first.run_id
    warning = capsys.readouterr().err.strip().splitlines()
    assert (
        len(warning) == 1
        and f"continuing W&B run {first.run_id}" in warning[0]
        and "WANDB_RUN_ID=envid0001" in warning[0]
    )
    train_and_evaluate(second, model, steps=[1], epoch=1)
    second.finish()
    assert {run["id"] for run in offline_runs(output_dir, count=3)} == {first.run_id}

    assert started(cfg, run_id="ckpt0001") == "ckpt0001"  # a checkpoint's id beats both
    assert id_file.read_text().strip() == "ckpt0001"
    cfg.resume = "never"  # a new run: WANDB_RUN_ID, or a new id
    assert started(cfg) == "envid0001" and id_file.read_text().strip() == "envid0001"
    monkeypatch.delenv("WANDB_RUN_ID")
    cfg.resume, cfg.checkpoint.weights_only = "auto", True  # weights only: a new run too
    fresh = started(cfg)
    assert fresh not in ("envid0001", "ckpt0001") and id_file.read_text().strip() == fresh
    cfg.checkpoint.weights_only = False
    for damaged in ("", "a/b c\n"):  # an empty or damaged file is ignored
        id_file.write_text(damaged)
        assert started(cfg) not in (damaged, damaged.strip(), fresh)


def _run_records(run_file: Path) -> list:
    """The records of a run file that may end in a record cut off by a kill."""
    try:
        return read_wandb_records(run_file)
    except DecodeError:
        return []


def test_a_train_py_run_killed_before_its_first_checkpoint_continues_its_wandb_run(
    tmp_path, offline_wandb, monkeypatch
):
    # one epoch of 1024 images in batches of 8: the first checkpoint is due at step 128, the run's end
    data = write_parquet_dataset(tmp_path / "data", train_rows=1024)
    out = tmp_path / "run"
    command = launch_command(1, launcher="python") + train_args(
        out, data, "--tracking.report_to", "wandb", "--train.epochs", "1", "--train.batch_size", "8"
    )
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
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
        for record in _run_records(path)
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
    killed = [record.run.run_id for record in _run_records(killed_file) if record.WhichOneof("record_type") == "run"]
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
    assert sorted(line.get_label() for line in loss_ax.lines) == ["eval", "train"]
    assert [line.get_label() for line in accuracy_ax.lines] == ["eval"] and len(lr_ax.lines) == 1
    assert len(lr_ax.lines[0].get_xydata()) == 128  # steps 1-128, the killed attempt's replaced


def test_report_to_none_writes_metrics_but_no_wandb_files(tmp_path, model):
    assert report_to(TrackingConfig(report_to="auto")) == "none"  # no mode, key or ~/.netrc here
    output_dir = tmp_path / "run"
    tracker = make_tracker(make_config("auto", plots=False), output_dir)
    assert tracker.report_to == "none"
    train_and_evaluate(tracker, model, steps=[5], epoch=1)
    tracker.finish()

    assert [row["step"] for row in read_metrics(output_dir)] == [5, 5]
    assert (output_dir / "confusion.json").is_file()
    assert not list(tmp_path.rglob("wandb")) and not (tmp_path / "wandb_dir").exists()
    assert not list(output_dir.glob("*.png")), "plots are off"


def test_auto_picks_wandb_from_mode_key_or_netrc(tmp_path, monkeypatch):
    auto = TrackingConfig(report_to="auto")
    assert report_to(TrackingConfig(report_to="tensorboard")) == "tensorboard"
    assert report_to(auto) == "none"
    (tmp_path / "home" / ".netrc").write_text("machine example.com login me password secret\n")
    assert report_to(auto) == "none"
    (tmp_path / "home" / ".netrc").write_text("machine api.wandb.ai login user password 0123456789\n")
    assert report_to(auto) == "wandb"
    monkeypatch.setenv("HOME", str(tmp_path))  # no .netrc there
    assert report_to(auto) == "none"
    monkeypatch.setenv("WANDB_API_KEY", "0123456789")
    assert report_to(auto) == "wandb"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert report_to(auto) == "wandb"


def test_wandb_without_credentials_prints_one_hint_and_goes_on(tmp_path, capsys, model):
    output_dir = tmp_path / "run"
    tracker = make_tracker(make_config("wandb", plots=False), output_dir)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "wandb login" in lines[0] and "WANDB_API_KEY" in lines[0] and "WANDB_MODE=offline" in lines[0]
    assert tracker.report_to == "none"

    train_and_evaluate(tracker, model, steps=[3, 6], epoch=1)
    tracker.finish()
    assert [row["step"] for row in read_metrics(output_dir)] == [3, 6, 6]
    assert not tracker.accelerator.trackers


def test_plots_are_images_and_follow_training(tmp_path, model):
    output_dir = tmp_path / "run"
    tracker = make_tracker(make_config("none"), output_dir)
    train_and_evaluate(tracker, model, steps=[10, 20], epoch=1)
    tracker.finish()  # waits for the background redraw and draws the final state
    first = {name: (output_dir / name).read_bytes() for name in ("curves.png", "confusion.png")}
    for name in first:
        pixels = matplotlib.image.imread(output_dir / name)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 300

    tracker = make_tracker(make_config("none"), output_dir)  # a resumed run appends
    train_and_evaluate(tracker, model, steps=[30, 40], epoch=2)
    tracker.finish()
    for name, old_bytes in first.items():
        assert (output_dir / name).read_bytes() != old_bytes, f"{name} did not change"


def test_read_series_lets_a_resumed_run_replace_the_old_tail(tmp_path):
    rows = [(10, 3.0), (20, 2.0), (30, 1.0), (20, 2.5), (30, 1.5), (40, 1.2)]  # resumed from step 10
    lines = [json.dumps({"step": step, "train/loss": loss}) for step, loss in rows]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 50, "train/lo')  # half-written line
    assert plot.read_series(tmp_path / "metrics.jsonl")["train/loss"] == [(10, 3.0), (20, 2.5), (30, 1.5), (40, 1.2)]
    # a run started before the keys were namespaced, resumed from step 10 by this version
    old = [
        {"step": 10, "train_loss": 3.0, "lr": 0.1},
        {"step": 20, "train_loss": 2.0, "lr": 0.1},
        {"step": 20, "eval_accuracy": 0.5, "eval_loss": 1.5},
        {"step": 20, "train/loss": 2.5, "train/lr": 0.2},
        {"step": 20, "eval/accuracy": 0.6, "eval/loss": 1.4},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in old))
    series = plot.read_series(tmp_path / "metrics.jsonl")
    assert set(series) == {"train/loss", "train/lr", "eval/accuracy", "eval/loss"}
    assert series["train/loss"] == [(10, 3.0), (20, 2.5)] and series["train/lr"] == [(10, 0.1), (20, 0.2)]
    assert series["eval/accuracy"] == [(20, 0.6)] and series["eval/loss"] == [(20, 1.4)]


def run_plot_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distcifar.plot", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


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


def test_plots_draw_the_logged_numbers(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(plot, "_save", lambda fig, path: drawn.__setitem__(Path(path).name, fig))
    rows = [
        {"step": 10, "train/loss": 2.0, "train/lr": 0.1},
        {"step": 20, "train/loss": 1.5, "train/lr": 0.05},
        {"step": 20, "eval/loss": 1.7, "eval/accuracy": 0.4},
        {"step": 30, "train/loss": 1.0, "train/lr": 0.01},
        {"step": 30, "eval/loss": 1.2, "eval/accuracy": 0.6},
    ]
    (tmp_path / plot.METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    confusion = [[3, 1], [0, 4]]
    plot.write_confusion(tmp_path, confusion, ["cat", "dog"], step=30, epoch=2, split="test")
    plot.redraw(tmp_path)
    loss_ax, accuracy_ax, lr_ax = drawn[plot.CURVES_PNG].axes[:3]
    lines = {
        (ax.get_title().split(" (")[0], line.get_label()): line.get_xydata().tolist()
        for ax in (loss_ax, accuracy_ax, lr_ax)
        for line in ax.lines
    }
    assert lines[("loss", "train")] == [[10, 2.0], [20, 1.5], [30, 1.0]]
    assert lines[("loss", "eval")] == [[20, 1.7], [30, 1.2]]
    assert lines[("accuracy", "eval")] == [[20, 0.4], [30, 0.6]]
    assert [xy for (title, _), xy in lines.items() if title == "learning rate"] == [[[10, 0.1], [20, 0.05], [30, 0.01]]]
    assert accuracy_ax.get_title() == "accuracy (best eval 0.6 at step 30)"
    confusion_ax = drawn[plot.CONFUSION_PNG].axes[0]
    assert confusion_ax.images[0].get_array().tolist() == confusion
    assert "87.50% of 8 correct" in confusion_ax.get_title()
    assert sorted(t.get_text() for t in confusion_ax.texts) == ["0", "1", "3", "4"]


def test_the_standard_wandb_variables_apply_where_the_config_is_silent(tmp_path, offline_wandb, model, monkeypatch):
    for name, value in {
        "WANDB_PROJECT": "from-env",
        "WANDB_NAME": "env-name",
        "WANDB_RUN_GROUP": "env-group",
        "WANDB_TAGS": "a,b",
        "WANDB_RUN_ID": "envid0001",
        "WANDB_DIR": str(tmp_path / "env-dir"),
    }.items():
        monkeypatch.setenv(name, value)
    tracker = make_tracker(make_config("wandb", plots=False), tmp_path / "env")
    assert tracker.run_id == "envid0001"
    train_and_evaluate(tracker, model, steps=[5], epoch=1)
    tracker.finish()
    assert not (tmp_path / "env" / "wandb").exists()
    (run,) = offline_runs(tmp_path / "env-dir", count=1)  # WANDB_DIR/wandb/offline-run-*
    assert run["id"] == "envid0001"
    assert run["init"] == {"project": "from-env", "name": "env-name", "group": "env-group", "tags": ["a", "b"]}
    # what the config sets wins over the environment
    cfg = make_config("wandb", plots=False)
    cfg.tracking.project, cfg.tracking.run_name, cfg.tracking.tags = "from-config", "config-name", ["c"]
    monkeypatch.delenv("WANDB_DIR")
    output_dir = tmp_path / "config"
    tracker = make_tracker(cfg, output_dir, run_id="given0002")
    train_and_evaluate(tracker, model, steps=[5], epoch=1)
    tracker.finish()
    (run,) = offline_runs(output_dir, count=1)
    assert run["id"] == "given0002"
    assert run["init"] == {"project": "from-config", "name": "config-name", "group": "env-group", "tags": ["c"]}
