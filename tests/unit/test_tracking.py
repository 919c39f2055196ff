"""Tracking, in the pytest process: real W&B in offline mode (read back from its .wandb files), metrics.jsonl,
PNG plots. tests/launch/test_tracking_runs.py holds the two that start processes (train.py, the plot command).

An offline run writes everything it would upload to OUTPUT_DIR/wandb/offline-run-*/run-<id>.wandb:
protobuf `Record`s in LevelDB's log framing (what `wandb sync` reads). wandb 0.31 ships no
Python reader for it any more, so `support.read_wandb_records` decodes the framing itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from accelerate import Accelerator

from distcifar import plot
from distcifar.config import Config, ModelConfig, TrackingConfig
from distcifar.data import normalize
from distcifar.files import read_jsonl
from distcifar.model import DistCifarNet
from distcifar.tracking import ATTEMPTS_FILE, RUN_ID_FILE, Tracker, git_commit, report_to
from support import offline_runs, read_metrics

pytestmark = pytest.mark.usefixtures("isolated_wandb_env")  # no W&B settings of the machine; HOME under tmp_path
HARDWARE = {"device": "cpu", "num_processes": 1, "mixed_precision": "no"}


# ---------------------------------------------------------------------------------------------
# A fake training loop


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


@pytest.mark.parametrize("resume", ["auto", "never"])
def test_a_restart_drops_the_rows_its_dead_attempt_logged_and_a_new_run_sets_the_file_aside(tmp_path, resume):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    rows = [json.dumps({"step": step, "train/loss": 1.0}) for step in range(1, 9)]
    (output_dir / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 9, "train/lo')  # cut off by the kill
    cfg = make_config("none", plots=False)
    cfg.resume = resume
    accelerator = Accelerator(cpu=True)
    tracker = Tracker(accelerator, cfg, output_dir, None, HARDWARE, start_step=6)  # resumed from step 6
    tracker.log({"train/loss": 0.5}, step=7)
    tracker.finish()
    if resume == "auto":  # the same run again: steps 7 and 8 are logged anew, once
        assert [row["step"] for row in read_metrics(output_dir)] == [1, 2, 3, 4, 5, 6, 7]
        assert not (output_dir / "metrics.1.jsonl").exists()
    else:  # --resume never starts another run: the old file is kept as it was, beside, and the new one is its own
        assert (output_dir / "metrics.1.jsonl").read_text() == "\n".join(rows) + '\n{"step": 9, "train/lo'
        assert (output_dir / "metrics.jsonl").read_text() == '{"step": 7, "train/loss": 0.5}\n'


def test_each_attempt_of_a_run_is_recorded_where_it_started_and_ended_and_a_new_run_starts_its_own_record(tmp_path):
    output_dir = tmp_path / "run"
    cfg = make_config("none", plots=False)

    def attempt(start_step: int, **finish) -> None:
        Tracker(Accelerator(cpu=True), cfg, output_dir, None, HARDWARE, start_step=start_step).finish(**finish)

    attempt(0, exit_code=143, step=6)  # stopped by SIGTERM after saving step 6
    with (output_dir / ATTEMPTS_FILE).open("a") as file:
        file.write('{"attempt": 2, "star')  # a start cut off by a kill: neither counted nor joined to the next line
    Tracker(Accelerator(cpu=True), cfg, output_dir, None, HARDWARE, start_step=6)  # killed outright: no end line
    attempt(6, step=9)  # resumed from step 6 and finished
    rows = read_jsonl(output_dir / ATTEMPTS_FILE)
    assert [(row["attempt"], row.get("from_step"), row.get("at_step"), row.get("exit_code")) for row in rows] == [
        (1, 0, None, None),
        (1, None, 6, 143),
        (2, 6, None, None),
        (3, 6, None, None),
        (3, None, 9, 0),
    ]
    started = [row for row in rows if "started" in row]
    assert all(row["git_commit"] == git_commit() for row in started)
    assert all(row["processes"] == 1 and row["started"].endswith("+00:00") for row in started)
    Tracker(Accelerator(cpu=True), cfg, output_dir, None, HARDWARE).finish()  # not a training run (the benchmark)
    assert read_jsonl(output_dir / ATTEMPTS_FILE) == rows

    cfg.resume = "never"  # a new run in the folder: the old record is kept beside, the new one starts at 1
    attempt(0, step=3)
    assert read_jsonl(output_dir / "attempts.1.jsonl") == rows
    assert [
        (row["attempt"], row.get("from_step"), row.get("at_step")) for row in read_jsonl(output_dir / ATTEMPTS_FILE)
    ] == [
        (1, 0, None),
        (1, None, 3),
    ]


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


def test_a_new_attempt_removes_what_a_killed_write_left_and_nothing_a_live_writer_holds(tmp_path):
    # A run killed while its background plot wrote curves.png left .curves.png.tmp<plotter's pid> for good.
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process that is gone: its pid is not running (and is not reused this quickly)
    left = [output_dir / f".curves.png.tmp{dead.pid}", output_dir / f".metrics.jsonl.tmp{dead.pid}"]
    live = output_dir / f".confusion.png.tmp{os.getpid()}"  # a writer that still runs: its file stays
    for path in [*left, live]:
        path.write_bytes(b"half a file")
    tracker = make_tracker(make_config("none", plots=False), output_dir)
    tracker.finish()
    assert not any(path.exists() for path in left) and live.exists()


def test_expert_metrics_are_each_conv_layers_weight_averaged_over_the_sample_images(tmp_path):
    """experts/block<b>/conv<c>: the expert branch's weight of conv layer c, the mean over the sample images of
    softmax(fc2(relu(fc1(pooled block input)))), computed here by hand from the block inputs of an eval forward."""
    torch.manual_seed(1)
    config = ModelConfig(
        block_convs=[1, 3],
        block_channels=[12, 24],
        block_halve=[False, True],
        classifier_hidden=[8],
        expert_reduction=2,
    )
    model = DistCifarNet(config).train()
    # each image one colour (as in support.make_images): block inputs, and so expert weights, that differ by image
    colours = torch.randint(0, 256, (6, 3, 1, 1), generator=torch.Generator().manual_seed(2))
    images = colours.expand(6, 3, 32, 32).to(torch.uint8)
    inputs = []
    hooks = [block.register_forward_pre_hook(lambda module, args: inputs.append(args[0])) for block in model.blocks]
    model.eval()
    expected = {}
    with torch.no_grad():
        for block in model.blocks:  # larger expert logits: weights far from uniform
            block.experts.fc2.weight.mul_(4)
        model(normalize(images))
        for b, (block, x) in enumerate(zip(model.blocks, inputs)):
            fc1, fc2 = block.experts.fc1, block.experts.fc2
            hidden = torch.relu(x.mean((2, 3)) @ fc1.weight.T + fc1.bias)
            per_image = torch.softmax(hidden @ fc2.weight.T + fc2.bias, dim=1)  # [images, convs]
            if per_image.shape[1] > 1:
                assert per_image.std(0).min() > 0.05, f"block {b}: the weights must vary over the images"
            expected.update({f"experts/block{b}/conv{c}": float(w) for c, w in enumerate(per_image.mean(0))})
    for hook in hooks:
        hook.remove()
    model.train()

    tracker = make_tracker(make_config("none", plots=False), tmp_path / "run")
    result = {
        "epoch": 1,
        "train_seconds": 1.0,
        "eval_accuracy": 0.5,
        "eval_loss": 1.0,
        "eval_samples": 20,
        "per_class_accuracy": [0.5] * 10,
        "confusion": (torch.eye(10, dtype=torch.long) * 2).tolist(),
        "eval_split": "test",
    }
    tracker.log_eval(result, 7, model, images, torch.zeros(6, dtype=torch.long))
    tracker.finish()
    (row,) = read_metrics(tmp_path / "run")
    logged = {key: value for key, value in row.items() if key.startswith("experts/")}
    assert sorted(logged) == sorted(expected)  # one metric per conv layer of each block, no more
    assert logged == pytest.approx(expected, abs=1e-6)
    assert model.training


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


@pytest.mark.parametrize(("smoothing", "floor"), [(0.1, 0.5003), (0.0, None)])
def test_the_loss_plot_draws_the_floor_label_smoothing_sets(tmp_path, monkeypatch, smoothing, floor):
    drawn = {}
    monkeypatch.setattr(plot, "_save", lambda fig, path: drawn.__setitem__(Path(path).name, fig))
    rows = [{"step": 10, "train/loss": 0.9, "train/lr": 0.1}, {"step": 10, "eval/loss": 0.4, "eval/accuracy": 0.9}]
    (tmp_path / plot.METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = Config(output_dir=str(tmp_path))
    config.optim.label_smoothing = smoothing
    (tmp_path / plot.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    plot.redraw(tmp_path)
    loss_ax = drawn[plot.CURVES_PNG].axes[0]
    floors = [line for line in loss_ax.lines if line.get_label().startswith("lowest training loss")]
    if floor is None:
        assert floors == []
    else:  # the entropy of the smoothed target: -(0.91 ln 0.91 + 9 x 0.01 ln 0.01)
        assert floors[0].get_label() == "lowest training loss (label smoothing 0.1)"
        assert floors[0].get_ydata()[0] == pytest.approx(floor, abs=1e-4)
