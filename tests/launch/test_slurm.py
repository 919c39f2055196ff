"""slurm/train.sh on a real (emulated) Slurm cluster: `bash slurm/testcluster.sh up`.

Skipped unless `sbatch` is on PATH, `sinfo` answers and DISTCIFAR_TEST_DATA points at the
CIFAR-10 parquet folder. Jobs run from the project root (logs/ there) with the python that runs
pytest, 2 nodes x 1 CPU process, configs/smoke.yaml.

  (a) a 2-node run completes: one distributed run over both nodes, checkpoint + summary.json
  (b) SIGUSR1 (`scancel --signal=USR1 --full`) mid-run: checkpoint, self-requeue, resume, finish;
      final weights bit-identical to (a)
  (c) a bad submission (unknown config key, missing data path) fails fast, error at the top
      of the log, never requeued, and the job's ExitCode is train.py's 2 (also through accelerate launch)
  (d) a plain scancel (SIGTERM), and SIGUSR1 past MAX_RESTARTS: checkpoint, no requeue
  (e) a 2-task array job (a seed sweep, --cpus-per-task=2) without OUTPUT_DIR or OMP_NUM_THREADS:
      one sweep folder runs/<name>-<array job id>, its own subfolder, value, both CPUs and as many
      threads per task; one task requeues itself alone after SIGUSR1, the other is requeued by Slurm
      (as under PreemptMode=REQUEUE); both resume from their checkpoint and finish
  (f) the worker of node 1 SIGKILLed mid-run: the step is restarted within the allocation (no requeue), resumes
      from the newest checkpoint and the job ends COMPLETED, weights bit-identical to (a)

The test cluster has no accounting (sacct), so exit codes are read from `scontrol show job`, which
reports the same ExitCode.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distcifar.files import read_jsonl
from distcifar.tracking import ATTEMPTS_FILE
from support import REPO, process_with_env, slurm_answers

DATA = os.environ.get("DISTCIFAR_TEST_DATA")


pytestmark = [
    pytest.mark.skipif(not DATA, reason="DISTCIFAR_TEST_DATA not set"),
    pytest.mark.skipif(not slurm_answers(), reason="no Slurm cluster (bash slurm/testcluster.sh up)"),
]

NODES = 2
# job ids can repeat (a test cluster set up afresh): a per-session job name keeps
# logs/<name>-<id>.out from appending to an old log
SESSION = f"{os.getpid()}"
# configs/smoke.yaml plus periodic checkpoints; identical for (a) and (b) so (a) is (b)'s
# reference. fp32 and no W&B whatever the CPU and environment: fast and deterministic. No plots and no
# test-time views after the end: each costs the shared cores more than the jobs' training.
TRAIN_ARGS = ["--checkpoint.every_steps", "3", "--train.mixed_precision", "no", "--tracking.report_to", "none"]
TRAIN_ARGS += ["--tracking.plots", "false", "--train.final_views", "false"]
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REQUEUE_HOLD",
    "SPECIAL_EXIT",
}


def job_env(output_dir: Path | None, one_thread: bool = True) -> dict:
    """The job's environment; output_dir None and one_thread False leave OUTPUT_DIR and OMP_NUM_THREADS to
    slurm/train.sh's own defaults."""
    # no SLURM_*/SBATCH_* from an enclosing job: they would change sbatch's options
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("OUTPUT_DIR", "OMP_NUM_THREADS")
    }
    env.update(
        PYTHON=sys.executable,
        CONFIG="configs/smoke.yaml",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
    )
    if output_dir is not None:
        env["OUTPUT_DIR"] = str(output_dir)
    if one_thread:  # one thread per process: the emulated nodes share this machine's cores
        env["OMP_NUM_THREADS"] = "1"
    return env


def submit(
    name: str,
    output_dir: Path | None,
    args: list[str],
    nodes: int = NODES,
    sbatch: tuple[str, ...] = (),
    one_thread: bool = True,
    **env: str,
) -> str:
    if "--data.path" not in args:
        args = ["--data.path", DATA, *args]
    out = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={nodes}", *sbatch, "slurm/train.sh", *args],
        cwd=REPO,
        env={**job_env(output_dir, one_thread), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_info(job: str) -> dict:
    """`scontrol show job` of a job id, or of one array task as ARRAYID_TASKID."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"job {job} unknown to scontrol: {out.stderr}"
    assert len(out.stdout.splitlines()) == 1, out.stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def log_of(name: str, job: str) -> Path:
    if "_" in job:  # an array task's log is named by its own job id
        job = job_info(job)["JobId"]
    return REPO / "logs" / f"{name}-{job}.out"


def wait_for(job: str, name: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job)
        if info["JobState"] in TERMINAL:
            return info
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            log = log_of(name, job)
            pytest.fail(
                f"job {job} still {info['JobState']} after {timeout:.0f} s; log:\n"
                + (log.read_text()[-4000:] if log.exists() else "(none)")
            )
        time.sleep(1)


def read_log(name: str, job: str) -> str:
    return log_of(name, job).read_text(errors="replace")


def final_weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(output_dir / "final" / "model.safetensors")


def assert_resumed_from_the_stop(log: str) -> int:
    """The requeued attempt resumed from the checkpoint written when the signal arrived (not an older one, not
    step 0). That step."""
    stopped = re.search(r"stopped by signal \d+ at step (\d+)", log)
    assert stopped, log[-4000:]
    step = int(stopped.group(1))
    assert re.search(rf"resumed from \S*step_{step:08d} at step {step}\b", log), log[-4000:]
    return step


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Test (a)'s job: an uninterrupted 2-node run. (output_dir, job id, job info)."""
    out = tmp_path_factory.mktemp("slurm-a") / "run"
    name = f"distcifar-test-a-{SESSION}"
    job = submit(name, out, TRAIN_ARGS)
    info = wait_for(job, name, timeout=600)
    return out, name, job, info


def test_two_node_run(reference_run):
    out, name, job, info = reference_run
    log = read_log(name, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert info["Restarts"] == "0"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == NODES  # one run spanning both nodes, 1 process each
    assert summary["global_step"] > 0
    # train.final_views false: no test-time views after the end, and the closing line names none
    assert summary["test_accuracy_hflip"] is summary["test_accuracy_hflip_translate"] is None
    closing = r"^0: test accuracy [\d.]+% on 500 images after 2 epochs \(.*evaluations\)$"
    assert re.search(closing, log, re.M), log[-2000:]
    assert not list(out.glob("*.png")) and "plots:" not in log  # tracking.plots false: none drawn, none named
    # both nodes' launchers took part, each with its own machine rank
    for rank in range(NODES):
        assert re.search(rf"^{rank}: \[train.sh node {rank}/{NODES}\]", log, re.M), log[:3000]
    assert (out / "final" / "model.safetensors").is_file()
    assert list((out / "checkpoints").glob("step_*")), "no checkpoint written"


def test_usr1_checkpoints_requeues_and_resumes(reference_run, tmp_path):
    ref_out = reference_run[0]
    out = tmp_path / "run"
    name = f"distcifar-test-b-{SESSION}"
    job = submit(name, out, TRAIN_ARGS)
    # wait for the first periodic checkpoint, then "preempt"
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("step_*")):
        info = job_info(job)
        assert info["JobState"] not in TERMINAL, read_log(name, job)[-4000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.5)
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True, timeout=30)
    info = wait_for(job, name, timeout=600)
    log = read_log(name, job)
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert int(info["Restarts"]) >= 1, log[-4000:]
    assert "requeueing job" in log, log[-4000:]
    step = assert_resumed_from_the_stop(log)
    assert "restart 1/" in log  # the second start logged its SLURM_RESTART_COUNT
    # attempts.jsonl: the requeued job is the run's second attempt, from the step the first saved at SIGUSR1 (138)
    attempts = [
        (row["attempt"], row.get("from_step"), row.get("at_step"), row.get("exit_code"))
        for row in read_jsonl(out / ATTEMPTS_FILE)
    ]
    final_step = json.loads((out / "summary.json").read_text())["global_step"]
    assert attempts == [(1, 0, None, None), (1, None, step, 138), (2, step, None, None), (2, None, final_step, 0)]
    print(f"USR1 -> finished after resume: {time.monotonic() - signalled:.0f} s")
    import torch

    ref, got = final_weights(ref_out), final_weights(out)
    assert ref.keys() == got.keys()
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


def wait_for_checkpoint(job: str, name: str, out: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not list((out / "checkpoints").glob("step_*")):
        assert job_info(job)["JobState"] not in TERMINAL, read_log(name, job)[-4000:]
        assert time.monotonic() < deadline, f"no checkpoint after {timeout:.0f} s"
        time.sleep(0.5)


def test_a_killed_node_task_is_restarted_within_the_job_and_finishes_bit_identical(reference_run, tmp_path):
    import psutil
    import torch

    out = tmp_path / "run"
    name = f"distcifar-test-f-{SESSION}"
    job = submit(name, out, TRAIN_ARGS)
    wait_for_checkpoint(job, name, out)
    deadline = time.monotonic() + 60
    while (worker := process_with_env(psutil.process_iter(), SLURM_JOB_ID=job, RANK="1")) is None:
        assert time.monotonic() < deadline, "no worker of rank 1 in the job"
        time.sleep(0.2)
    worker.send_signal(9)  # node 1's training process, as an OOM kill or a lost node ends it
    info = wait_for(job, name, timeout=600)
    log = read_log(name, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log[-4000:]  # within the job, no requeue
    assert "restarting it in this allocation from the newest checkpoint" in log, log[-4000:]
    assert "(restart 1/10, 9 left)" in log, log[-4000:]
    assert re.search(r"resumed from \S*step_\d+ at step [1-9]", log), log[-4000:]
    ref, got = final_weights(reference_run[0]), final_weights(out)
    different = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


def test_plain_scancel_and_the_restart_limit_checkpoint_without_requeue(tmp_path):
    # side by side on one node each: a plain scancel (SIGTERM), and SIGUSR1 with MAX_RESTARTS=0
    jobs = {
        "term": (f"distcifar-test-d1-{SESSION}", {}, []),
        "usr1": (f"distcifar-test-d2-{SESSION}", {"MAX_RESTARTS": "0"}, ["--signal=USR1", "--full"]),
    }
    submitted = {key: submit(name, tmp_path / key, TRAIN_ARGS, nodes=1, **env) for key, (name, env, _) in jobs.items()}
    for key, (name, _, scancel_args) in jobs.items():
        wait_for_checkpoint(submitted[key], name, tmp_path / key)
        subprocess.run(["scancel", *scancel_args, submitted[key]], check=True, timeout=30)
    for key, (name, _, _) in jobs.items():
        info = wait_for(submitted[key], name, timeout=300)
        log = read_log(name, submitted[key])
        assert info["Restarts"] == "0" and "requeueing job" not in log, log[-4000:]
        stopped = re.search(r"stopped by signal \d+ at step (\d+)", log)
        assert stopped, log[-4000:]
        assert (tmp_path / key / "checkpoints" / f"step_{int(stopped.group(1)):08d}" / "manifest.json").is_file()
        assert not (tmp_path / key / "summary.json").exists()
        expected = (
            "not requeued. Resubmit to resume"
            if key == "term"
            else "restart limit MAX_RESTARTS=0 reached: not requeueing"
        )
        assert expected in log, log[-4000:]


def test_bad_submission_fails_fast_without_requeue(tmp_path):
    # both at once: the unknown key on 2 nodes (accelerate launch), the missing path on 1 node
    # (plain python); the cluster runs them side by side or one after the other
    cases = {
        f"distcifar-test-c1-{SESSION}": (["--train.no_such_key", "1"], NODES, "no_such_key"),
        f"distcifar-test-c2-{SESSION}": (["--data.path", str(tmp_path / "missing")], 1, "missing"),
    }
    started = time.monotonic()
    jobs = {name: submit(name, tmp_path / name, args, nodes=nodes) for name, (args, nodes, _) in cases.items()}
    for name, job in jobs.items():
        info = wait_for(job, name, timeout=180)
        log = read_log(name, job)
        assert info["JobState"] == "FAILED", log[-3000:]
        assert info["ExitCode"] == "2:0", log[-3000:]  # a usage error, not accelerate launch's 1
        assert info["Restarts"] == "0"
        head = log.splitlines()[:12]
        errors = [line for line in head if "error:" in line and cases[name][2] in line]
        assert errors, "no error line at the top of the log:\n" + "\n".join(head)
        assert "requeueing" not in log
    assert time.monotonic() - started < 120


def test_exit_code_file_is_written_by_the_main_process_only(tmp_path):
    # the hook slurm/train.sh reads; RANK 1 is a worker that is not the main process
    for rank, expected in (("0", "2\n"), ("1", None)):
        path = tmp_path / f"exit-{rank}"
        env = {**os.environ, "DISTCIFAR_EXIT_CODE_FILE": str(path), "RANK": rank}
        out = subprocess.run(
            [sys.executable, "distcifar/train.py", "--train.no_such_key", "1"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2, out.stderr[-2000:]
        assert (path.read_text() if path.exists() else None) == expected


def test_array_tasks_own_folders_and_requeue_alone():
    name = f"distcifar-test-e-{SESSION}"
    # SLURM_CPU_BIND=cores stands in for a cluster that binds tasks to cores (TaskPluginParam=Cores): without
    # srun --cpus-per-task each task would be bound to 1 CPU. 2 epochs of 8 steps: task `other` is still training
    # when task `own` has requeued itself (a checkpoint every 3 steps; own's requeue takes ~5 s, a step ~3 s).
    # Neither OUTPUT_DIR nor OMP_NUM_THREADS is set: the script's defaults run (one sweep folder
    # runs/<job name>-<array job id>/<task>, relative to the project; threads = the task's CPUs).
    array = submit(
        name,
        None,
        TRAIN_ARGS,
        nodes=1,
        sbatch=("--array=0-1", "--cpus-per-task=2"),
        one_thread=False,
        SWEEP="train.seed=5,6",
        SLURM_CPU_BIND="cores",
    )
    sweep = REPO / "runs" / f"{name}-{array}"
    tasks = {task: f"{array}_{task}" for task in (0, 1)}
    try:
        try:
            for task, spec in tasks.items():
                wait_for_checkpoint(spec, name, sweep / str(task))
            # the task that holds the array's own job id: a plain `scontrol requeue $SLURM_JOB_ID` there
            # requeues every task of the array
            own = next(task for task, spec in tasks.items() if job_info(spec)["JobId"] == array)
            other = 1 - own
            subprocess.run(["scancel", "--signal=USR1", "--full", tasks[own]], check=True, timeout=30)
            deadline = time.monotonic() + 120
            while job_info(tasks[own])["Restarts"] == "0":
                assert time.monotonic() < deadline, read_log(name, tasks[own])[-4000:]
                time.sleep(0.5)
            info = job_info(tasks[other])
            assert info["Restarts"] == "0", f"task {other} was requeued with task {own}"
            assert info["JobState"] == "RUNNING", f"task {other} is {info['JobState']}: too late to requeue it mid-run"
            subprocess.run(["scontrol", "requeue", tasks[other]], check=True, timeout=30)  # as PreemptMode=REQUEUE
            infos = {task: wait_for(spec, name, timeout=400) for task, spec in tasks.items()}
        finally:
            subprocess.run(["scancel", array], timeout=30)  # nothing of a failed test keeps running

        # one sweep folder, named by the array's job id, not one per task's own job id
        assert sorted(p.name for p in (REPO / "runs").glob(f"{name}-*")) == [sweep.name]
        for task, spec in tasks.items():
            log = read_log(name, spec)
            assert infos[task]["JobState"] == "COMPLETED" and infos[task]["Restarts"] == "1", log[-4000:]
            assert_resumed_from_the_stop(log)  # from the relative runs/... folder, by --resume auto
            assert f"output runs/{sweep.name}/{task}" in log, log[:3000]
            assert f"{'requeueing job' if task == own else 'Slurm is requeueing job'} {spec}" in log, log[-4000:]
            assert "1 process(es), single launch, 2 CPU(s)" in log, log[:3000]  # srun got --cpus-per-task
            # OMP_NUM_THREADS from the task's CPUs, set by train.sh (a one-process task runs train.py itself)
            assert "(DistributedType.NO, 2 threads: OMP_NUM_THREADS=2)" in log, log[:3000]
            out = sweep / str(task)
            assert json.loads((out / "config.json").read_text())["train"]["seed"] == 5 + task
            assert json.loads((out / "summary.json").read_text())["global_step"] == 16
    finally:
        shutil.rmtree(sweep, ignore_errors=True)  # in the project's runs/: not left behind
