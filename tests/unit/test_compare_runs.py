"""scripts/compare_runs.py, the table of recipe variants in results/: each run's change against the baseline, its
accuracy at each evaluated epoch (aligned by epoch, not by position), its final figures and the load it ran beside,
read from run folders laid out as train.py leaves them; and what gpu_check reads from such a folder."""

import importlib
import json
import shutil
import sys

from distcifar.config import Config, parse_config
from support import REPO


def _run_folder(
    folder, cfg: Config, evaluations: list[tuple[int, float, float, float]], raw: float | None, load, older=False
):
    """A finished run as train.py leaves it: config.json, metrics.jsonl (step, epoch, accuracy, training seconds
    per evaluation), summary.json; and the proxy runner's load samples in FOLDER.load."""
    folder.mkdir()
    stored = cfg.to_dict()
    if older:  # config.json as a run older than data.crop_padding_mode wrote it: it ran with the default
        del stored["data"]["crop_padding_mode"]
    (folder / "config.json").write_text(json.dumps(stored))
    rows = [{"step": 1, "train/loss": 2.3}]
    rows += [
        {"step": s, "train/epoch": e, "eval/accuracy": a, "eval/loss": 1.0, "train/seconds": t}
        for s, e, a, t in evaluations
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {"test_accuracy": evaluations[-1][2], "train_seconds": evaluations[-1][3], "images_per_second": 100.0}
    summary.update(mixed_precision="no", eval_samples=10000, **({"test_accuracy_raw": raw} if raw else {}))
    summary.update(test_accuracy_hflip=evaluations[-1][2] + 0.01, test_accuracy_hflip_translate=None)
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder.parent / f"{folder.name}.load").write_text("".join(f"2026-12-02T00:0{i}:00 {v} 1.0 1.0\n" for i, v in load))


def test_the_table_names_each_change_and_aligns_evaluations_by_epoch(tmp_path, monkeypatch, capsys):
    baseline, variant = Config(), Config()
    variant.model.dropout, variant.train.batch_size = 0.25, 256  # two changes, both named
    variant.data.crop_padding_mode = "zeros"  # the default, which the baseline's older config.json lacks: no change
    evaluations, load = [(195, 1.0, 0.5, 10.0), (390, 2.0, 0.75, 20.0)], [(0, 3.0), (1, 5.0)]
    _run_folder(tmp_path / "base", baseline, evaluations, 0.7, load, older=True)
    _run_folder(
        tmp_path / "half", variant, [(48, 0.5, 0.25, 4.0), (97, 1.0, 0.625, 9.0), (194, 2.0, 0.8, 19.0)], None, []
    )
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    compare_runs = importlib.import_module("compare_runs")
    out = tmp_path / "results" / "table"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "compare_runs.py",
            f"base={tmp_path / 'base'}",
            f"half={tmp_path / 'half'}",
            "--out",
            str(out),
            "--title",
            "T",
            "--conditions",
            "C",
        ],
    )
    assert compare_runs.main() == 0
    record = json.loads(out.with_suffix(".json").read_text())
    base, half = record["runs"]
    assert base["changes"] == {} and half["changes"] == {"model.dropout": 0.25, "train.batch_size": 256}
    assert [e["test_accuracy"] for e in half["epochs"]] == [0.25, 0.625, 0.8]
    assert (base["test_accuracy"], base["test_accuracy_raw"], half["test_accuracy_raw"]) == (0.75, 0.7, None)
    assert base["mean_load_1min"] == 4.0 and half["mean_load_1min"] is None
    lines = out.with_suffix(".md").read_text().splitlines()
    assert lines[0] == "# T" and "C" in lines
    assert (
        "| run | change against the baseline | ep 0.5 | ep 1 | ep 2 | final | mirror | mirror + shifts | without EMA "
        "| train s | load |" in lines
    )
    assert "| base | (the baseline) |  | 50.00 | 75.00 | **75.00** | 76.00 |  | 70.00 | 20 | 4.0 |" in lines
    assert (
        "| half | `model.dropout` 0.25, `train.batch_size` 256 | 25.00 | 62.50 | 80.00 | **80.00** | 81.00 |  |  | 19 |"
        "  |" in lines
    )


def test_previous_keeps_its_rows_and_takes_the_new_runs_changes_against_its_baseline(tmp_path, monkeypatch):
    """The run folders of an earlier comparison are gone (another machine): --previous extends it all the same."""
    variant, later = Config(), Config()
    variant.model.dropout = 0.25
    later.optim.lr = 0.4
    _run_folder(tmp_path / "base", Config(), [(195, 1.0, 0.5, 10.0)], None, [])
    _run_folder(tmp_path / "half", variant, [(195, 1.0, 0.6, 10.0)], None, [])
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    compare_runs = importlib.import_module("compare_runs")
    first, second = tmp_path / "first", tmp_path / "second"
    argv = ["compare_runs.py", f"base={tmp_path / 'base'}", f"half={tmp_path / 'half'}", "--out", str(first)]
    monkeypatch.setattr(sys, "argv", [*argv, "--title", "T", "--conditions", "C"])
    assert compare_runs.main() == 0
    for gone in ("base", "half"):
        shutil.rmtree(tmp_path / gone)
    _run_folder(tmp_path / "lr", later, [(195, 1.0, 0.7, 10.0)], None, [])
    argv = ["compare_runs.py", "--previous", f"{first}.json", f"lr={tmp_path / 'lr'}", "--out", str(second)]
    monkeypatch.setattr(sys, "argv", argv)
    assert compare_runs.main() == 0
    record = json.loads(second.with_suffix(".json").read_text())
    assert (record["title"], record["conditions"]) == ("T", "C")
    assert [row["name"] for row in record["runs"]] == ["base", "half", "lr"]
    assert record["runs"][1]["changes"] == {"model.dropout": 0.25}
    assert record["runs"][2]["changes"] == {"optim.lr": 0.4}  # against the baseline, not the row before it
    assert record["baseline_config"] == Config().to_dict()
    assert "| lr | `optim.lr` 0.4 | 70.00 | **70.00** | 71.00 |  |  | 10 |  |" in second.with_suffix(".md").read_text()


def test_each_variant_and_the_default_recipe_train_what_the_committed_lever_table_says(monkeypatch):
    """gpu_check's VARIANTS override configs/default.yaml, which the sweep's winner has since replaced: parsed
    today, each variant's config differs from the committed lever table's baseline by exactly what its row (or its
    name) says it changed, so `--variants NAME` reproduces the committed figure; and configs/default.yaml itself
    is the cutout-12 lever's configuration, field for field."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    gpu_check, compare_runs = (importlib.import_module(name) for name in ("gpu_check", "compare_runs"))
    levers = json.loads((REPO / "results" / "2026-12-06-cpu-default-30ep-levers.json").read_text())
    expected = {
        f"default-30ep-lr0.4{'' if row['name'] == 'baseline' else '-' + row['name']}": row["changes"]
        for row in levers["runs"]
    }
    for lr in ("0.1", "0.2", "0.4", "0.8"):  # the 10-epoch sweep ran on the same recipe (lr 0.4 is the baseline's)
        expected[f"default-10ep-lr{lr}"] = {"train.epochs": 10} | ({} if lr == "0.4" else {"optim.lr": float(lr)})
    expected["default-10ep-lr0.4-wd0.001"] = {"train.epochs": 10, "optim.weight_decay": 0.001}
    expected[""] = expected["default-30ep-lr0.4-reflect-cutout12"]  # configs/default.yaml itself: the sweep's winner
    expected["default-seed1"] = expected[""] | {"train.seed": 1}
    expected["default-cutout16"] = expected[""] | {"data.cutout_size": 16}
    assert sorted(expected) == sorted(["", *gpu_check.VARIANTS])
    command = ["--config", str(REPO / "configs" / "default.yaml"), "--resume", "auto", "--tracking.report_to", "none"]
    command += ["--data.path", levers["baseline_config"]["data"]["path"]]  # as gpu_check gave them (train_command)
    for name, changes in expected.items():
        cfg = parse_config([*command, *gpu_check.VARIANTS.get(name, [])], prog="test", description="")[0]
        assert compare_runs.changes(cfg.to_dict(), levers["baseline_config"]) == changes, name


def test_gpu_check_says_whether_each_step_was_logged_once_and_lists_the_attempts_in_order(tmp_path, monkeypatch):
    """A long run's result (gpu_check's training_result) says whether its metrics hold each logged step and each
    evaluation once, in order, however many attempts it took; and each attempt, start and end joined."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    gpu_check = importlib.import_module("gpu_check")
    folder = tmp_path / "run"
    _run_folder(folder, Config(), [(10, 1.0, 50.0, 60.0), (20, 2.0, 60.0, 120.0)], None, [])
    starts_and_ends = [
        {"attempt": 1, "started": "t0", "from_step": 0, "git_commit": "a"},
        {"attempt": 1, "ended": "t1", "at_step": 12, "exit_code": 143},
        {"attempt": 2, "started": "t2", "from_step": 12, "git_commit": "b"},
    ]
    (folder / "attempts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in starts_and_ends))
    result = gpu_check.training_result(folder)
    assert result["steps_logged_once"]
    assert result["attempts"] == [starts_and_ends[0] | starts_and_ends[1], starts_and_ends[2]]

    with (folder / "metrics.jsonl").open("a") as metrics:  # an attempt's evaluation logged again
        metrics.write(
            json.dumps({"step": 20, "train/epoch": 2.0, "eval/accuracy": 60.0, "eval/loss": 1.0, "train/seconds": 1.0})
            + "\n"
        )
    assert not gpu_check.training_result(folder)["steps_logged_once"]
    rows = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("\n".join([*rows[:-1], json.dumps({"step": 1, "train/loss": 2.0})]) + "\n")
    assert not gpu_check.training_result(folder)["steps_logged_once"]  # a training step logged twice
