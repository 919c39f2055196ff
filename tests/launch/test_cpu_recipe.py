"""configs/cpu.yaml, the README's main command, on a slice of the real CIFAR-10 copy: it learns, and its
checkpoint timer saves when its minutes say. Its own file: the longest test of the suite, so that .ci/run's
workers can share it out (tests/conftest.py)."""

import json

from support import launch_command, read_metrics, run

TIMER_MINUTES = 0.05  # 3 s: several saves per 39-step epoch of the CPU recipe, however fast the CPU


def test_the_cpu_recipe_learns_real_cifar10_and_saves_on_the_timer(tmp_path, real_data):
    # configs/cpu.yaml (the README's main command) on a slice: 10,000 images, 3 epochs, 2,000 test images, logged at
    # a real cadence (every 10 steps), with a checkpoint timer of TIMER_MINUTES and every checkpoint kept; no plots
    # and no test-time views after the end (they would cost a sixth of the test's time)
    out = tmp_path / "real"
    run(
        launch_command(1)
        + [
            "--config",
            "configs/cpu.yaml",
            "--output_dir",
            str(out),
            "--data.path",
            str(real_data),
            "--data.train_limit",
            "10000",
            "--data.eval_limit",
            "2000",
            "--train.epochs",
            "3",
            "--train.log_every",
            "10",
            "--tracking.report_to",
            "none",
            "--tracking.plots",
            "false",
            "--train.final_views",
            "false",
            "--checkpoint.every_minutes",
            str(TIMER_MINUTES),
            "--checkpoint.keep",
            "1000",
        ],
        timeout=900,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_samples"] == 2000 and summary["global_step"] == 117
    # chance is 0.10 and colour statistics alone reach about 0.2; this run reaches about 0.39-0.42
    assert summary["test_accuracy"] > 0.33, summary
    evals = [m["eval/accuracy"] for m in read_metrics(out) if "eval/accuracy" in m]
    assert evals == sorted(evals) and evals[-1] > evals[0] + 0.1
    losses = [m["train/loss"] for m in read_metrics(out) if "train/loss" in m]
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3
    _assert_saved_on_the_timer(out, TIMER_MINUTES * 60, steps_per_epoch=39, log_every=10, batch=256)


def _assert_saved_on_the_timer(out, timer_s: float, steps_per_epoch: int, log_every: int, batch: int):
    """The saves of a run against its own records. A save is due at the first step whose check finds timer_s passed
    since the last save (of any kind), so: (1) between two saves a and b the steps up to b - 2 trained for less than
    timer_s (their training time, from each logged window's images/s, lies within the timer's interval), and (2) a
    save for the timer (not an epoch end) is written at least timer_s after the save before it (manifest times).
    Both hold however busy the machine is; a timer in the wrong unit, or one never reset, breaks one of them."""
    saves = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step_*"))
    written = {step: (out / "checkpoints" / f"step_{step:08d}" / "manifest.json").stat().st_mtime for step in saves}
    window_seconds = {
        m["step"]: log_every * batch / m["train/images_per_second"] for m in read_metrics(out) if "train/loss" in m
    }
    timer_saves = [step for step in saves if step % steps_per_epoch]
    assert timer_saves, f"no save for the timer: {saves}"
    for before, step in zip([0, *saves], saves):
        trained = sum(t for end, t in window_seconds.items() if before <= end - log_every and end <= step - 2)
        assert trained < timer_s, f"{trained:.2f} s of training between the saves at {before} and {step}"
        if step in timer_saves and before:
            apart = written[step] - written[before]
            assert apart >= timer_s - 0.05, f"saves at {before} and {step} only {apart:.2f} s apart"
