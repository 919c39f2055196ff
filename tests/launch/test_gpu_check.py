"""scripts/gpu_check.py --dry-run: the GPU check's whole path on the CPU (the benchmark and a training run
of the real recipes, shrunk), so that the run on a borrowed GPU cannot fail on a typo; and each result file
holds what the README's Results table is made from."""

import datetime
import json
import re
import sys

from support import run


def test_dry_run_writes_each_result_the_results_table_needs_and_resume_continues_only_unfinished_runs(
    tmp_path, synthetic_data
):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "scripts/gpu_check.py",
        "--dry-run",
        "--only",
        "benchmark,default",
        "--budget",
        "400",
        "--data",
        str(synthetic_data),
        "--out",
        str(out),
        "--runs",
        str(tmp_path / "runs"),
    ]
    run(command, timeout=600)
    prefix = next(out.glob("*-log.txt")).name.removesuffix("log.txt")  # <date>-cpu-<model>-: CPU figures say so
    assert prefix.startswith(f"{datetime.date.today().isoformat()}-cpu-")
    names = sorted(path.name.removeprefix(prefix) for path in out.iterdir())
    assert names == ["benchmark.json", "default-curves.png", "default.json", "log.txt"]
    assert (out / f"{prefix}default-curves.png").read_bytes() == (tmp_path / "runs/default/curves.png").read_bytes()

    benchmark = json.loads(next(out.glob("*-cpu-*benchmark.json")).read_text())
    assert benchmark["device_name"] and benchmark["recipe"] == "configs/default.yaml" and benchmark["dry_run"]
    assert benchmark["loop_images_per_second"] > 0 and benchmark["loop_vs_bare_ratio"] > 0

    default = json.loads(next(out.glob("*-cpu-*default.json")).read_text())
    summary = json.loads((tmp_path / "runs" / "default" / "summary.json").read_text())
    assert default["exit_code"] == 0 and default["finished"] and default["dry_run"]
    assert default["device_name"].startswith("CPU ")  # a CPU figure says so
    assert default["recipe"] == "configs/default.yaml" and default["test_accuracy"] == summary["test_accuracy"]
    assert default["images_per_second"] == summary["images_per_second"] > 0
    epochs = default["epochs"]
    assert [e["epoch"] for e in epochs] == [1.0, 2.0]
    assert 0 < epochs[0]["train_seconds"] < epochs[1]["train_seconds"] == summary["train_seconds"]
    reached = [e for e in epochs if e["test_accuracy"] >= 0.93]
    assert default["seconds_to_93"] == (reached[0]["train_seconds"] if reached else None)
    assert default["epochs_to_93"] == (reached[0]["epoch"] if reached else None)
    assert default["model_parameters"] == summary["model_parameters"] > 0 and len(default["git_commit"]) == 40
    mirrored = json.loads((tmp_path / "runs" / "default" / "eval_hflip.json").read_text())
    assert mirrored["eval_hflip"] and mirrored["eval_samples"] == summary["eval_samples"]
    assert default["test_accuracy_hflip"] == mirrored["eval_accuracy"] == summary["test_accuracy_hflip"]  # the export
    assert default["test_accuracy_hflip_translate"] == summary["test_accuracy_hflip_translate"]
    assert default["steps_logged_once"] and [a["attempt"] for a in default["attempts"]] == [1]
    first = default["attempts"][0]
    assert first["from_step"] == 0 and first["at_step"] == summary["global_step"] and first["exit_code"] == 0
    assert first["git_commit"] == default["git_commit"] and first["started"] <= first["ended"]

    log = next(out.glob("*-cpu-*log.txt")).read_text()
    for logged in (
        "-m distcifar.benchmark --config configs/default.yaml",
        "-m distcifar.train --config configs/default.yaml",
        "-m distcifar.evaluate",
    ):
        assert logged in log

    # --resume (the long CPU runs, across sittings): a run folder is continued, not started afresh; a run that
    # finished and was evaluated in an earlier sitting is left as it is (neither trained nor evaluated again) and
    # its result file stands
    resume = [*command[:4], "default", "--resume", *command[5:]]
    written = next(out.glob("*-cpu-*default.json")).read_bytes()
    again = run(resume, timeout=600)
    assert "default: finished earlier, its result stands as written then" in again.stdout
    assert "-m distcifar.train" not in again.stdout and "-m distcifar.evaluate" not in again.stdout
    assert next(out.glob("*-cpu-*default.json")).read_bytes() == written
    # a sitting that ended before the evaluation: train.py continues the folder (--resume auto; here nothing is
    # left to train) and the result is written anew with the same evaluations
    (tmp_path / "runs" / "default" / "eval_hflip.json").unlink()
    again = run(resume, timeout=600)
    assert "--resume auto" in again.stdout and "resumed from" in again.stdout
    continued = json.loads(next(out.glob("*-cpu-*default.json")).read_text())
    assert continued["epochs"] == epochs and continued["steps_logged_once"]
    assert [(a["attempt"], a["from_step"], a["at_step"]) for a in continued["attempts"]] == [
        (1, 0, summary["global_step"]),
        (2, summary["global_step"], summary["global_step"]),
    ]

    # --report (a sitting that ends mid-run): nothing runs; a finished run is left to its result file, and an
    # unfinished run is written as <run>-partial.json with its evaluations so far, its checkpoints and the command
    # that continues it
    report = run([*resume, "--report"], timeout=600)
    assert "default: finished, nothing to report" in report.stdout and not list(out.glob("*-partial.json"))
    (tmp_path / "runs" / "default" / "summary.json").unlink()  # as if the run had not reached its end
    report = run([*resume, "--report"], timeout=600)
    assert "-m distcifar." not in report.stdout  # nothing trained, benchmarked or evaluated
    partial = json.loads(next(out.glob("*-cpu-*default-partial.json")).read_text())
    assert not partial["finished"] and partial["exit_code"] is None and partial["epochs"] == epochs
    assert partial["checkpoints"] == sorted(p.name for p in (tmp_path / "runs/default/checkpoints").glob("step_*"))
    assert partial["checkpoints"] and "--resume auto" in partial["command"]


def test_variants_runs_only_the_named_ones_in_the_order_given(tmp_path):
    """--variants: on a machine without the earlier runs' folders, only the rest of the list (here --report, which
    trains nothing, names each variant it would have run)."""
    command = [sys.executable, "scripts/gpu_check.py", "--only", "variants", "--report", "--runs", str(tmp_path)]
    names = ["default-30ep-lr0.4-altflip", "default-10ep-lr0.2"]
    report = run([*command, "--out", str(tmp_path / "out"), "--variants", ",".join(names)])
    assert re.findall(r"\] (default-\S+): no evaluation yet", report.stdout) == names
    unknown = run([*command, "--variants", "default-30ep-lr9"], check=False)
    assert unknown.returncode == 2 and "--variants: unknown name(s) ['default-30ep-lr9']" in unknown.stderr
