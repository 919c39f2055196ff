"""Real launches: launcher commands, train.py's arguments for a tiny run, starting, finishing and killing a launch
(and its workers), and the Accelerator the probes build."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from support.repo import PROBES, REPO, TINY_MODEL

BIN = Path(sys.executable).parent


def probe(name: str) -> str:
    """The path of tests/probes/<name>.py, a script a launcher runs in place of train.py."""
    path = PROBES / f"{name}.py"
    assert path.is_file(), f"no probe {path}"
    return str(path)


def tool(name: str) -> str | None:
    """A launcher installed next to this python (the venv's), else on PATH."""
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name)


ACCELERATE, TORCHRUN = tool("accelerate"), tool("torchrun")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str, *options: str) -> list[str]:
    """`accelerate launch --config_file launch/<config> --main_process_port <free port> OPTIONS`; the script and
    its arguments follow."""
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        str(REPO / "launch" / config),
        "--main_process_port",
        str(free_port()),
        *options,
    ]


def torchrun(nproc: int) -> list[str]:
    """`torchrun --nproc_per_node N` on a free local port; the script and its arguments follow."""
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port())]


def launch_command(processes: int = 1, launcher: str = "accelerate", script: str = "distcifar/train.py") -> list[str]:
    """`script` (relative to the repository) as users start it: plain python, `accelerate launch` with
    launch/cpu.yaml for 1 process, or launch/cpu_multi.yaml with --num_processes N."""
    if launcher == "python":
        return [sys.executable, script]
    if processes == 1:
        return [ACCELERATE, "launch", "--config_file", "launch/cpu.yaml", script]
    return [*accelerate_launch("cpu_multi.yaml", "--num_processes", str(processes)), script]


def train_args(output_dir: Path, data: Path, *extra: str) -> list[str]:
    """A tiny, fast run of train.py on `data`: 256 images, batch 32, 2 epochs."""
    return [
        "--output_dir",
        str(output_dir),
        "--data.path",
        str(data),
        *TINY_MODEL,
        "--train.epochs",
        "2",
        "--train.batch_size",
        "32",
        "--train.eval_batch_size",
        "50",
        "--train.log_every",
        "1",
        "--tracking.report_to",
        "none",
        "--tracking.plots",  # a plot after every evaluation is a background process competing for the cores
        "false",
        "--optim.name",
        "adam",
        "--optim.lr",
        "0.003",
        "--optim.schedule",
        "cosine",
        "--optim.warmup_epochs",
        "0.5",
        *extra,
    ]


def run(command: list[str], timeout: float = 300, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a command in the repository to its end; with check, a non-zero exit fails the test with its output."""
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{command} exited {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
        )
    return result


def start(command: list[str], env: dict | None = None, separate_stderr: bool = False) -> subprocess.Popen:
    """Start a launch in the repository without waiting: in a session of its own (so a signal to its process
    group reaches every process of the job, as scancel and Ctrl-C do), output piped as text, stderr into
    stdout unless separate_stderr."""
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float) -> tuple[int, str, str]:
    """Wait for a launch started with separate_stderr: (exit code, stdout, stderr). One still running after
    `timeout` seconds is killed, workers included, and the kill noted at the end of stderr."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(
            process.pid
        )  # the launcher and its workers (torch's elastic agent starts them in sessions of their own)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)  # and whatever is left in the launcher's own process group
        out, err = process.communicate()
        err += f"\n[test] killed after {timeout} s"
    return process.returncode, out, err


def worker_exit_codes(launcher_output: str) -> dict[int, int]:
    """{rank: exit code} of the workers that failed, from the report torch's elastic launcher (under accelerate
    launch and torchrun) prints when a worker fails: its record of each worker process. A worker it killed itself
    after another had failed shows as -15."""
    import re

    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", launcher_output)
    return {int(rank): int(code) for rank, code in found}


def kill_tree(pid: int, signum: int = 9) -> None:
    """Signal a process and all its descendants: torch's elastic launcher starts its workers in
    sessions of their own, so killing the launcher's process group would leave them running."""
    import psutil

    try:
        parent = psutil.Process(pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def process_with_env(candidates, **env: str):
    """The first of `candidates` (psutil processes) whose environment holds every NAME=VALUE of `env`, or None."""
    import psutil

    for process in candidates:
        with contextlib.suppress(psutil.Error):
            environment = process.environ()
            if all(environment.get(name) == value for name, value in env.items()):
                return process
    return None


def sigkill_rank_after(process: subprocess.Popen, checkpoint: Path, rank: int, delay_s: float, timeout: float = 300):
    """Once `checkpoint` (a step folder) is complete, wait `delay_s` and SIGKILL the launched worker of `rank`, as an
    OOM kill or a segfault would end it; that worker's pid."""
    import psutil

    deadline = time.monotonic() + timeout
    while not (checkpoint / "manifest.json").exists():
        assert process.poll() is None, f"the run ended before {checkpoint.name}"
        assert time.monotonic() < deadline, f"no {checkpoint.name} after {timeout} s"
        time.sleep(0.02)
    time.sleep(delay_s)
    worker = process_with_env(psutil.Process(process.pid).children(recursive=True), RANK=str(rank))
    assert worker is not None, f"no worker of rank {rank} under the launcher"
    worker.send_signal(9)
    return worker.pid


def probe_accelerator(output_dir: str, timeout_s: int = 120):
    """For the probes: the Accelerator train.py would build (runtime.build_accelerator, its own WORLD_SIZE check
    included), fp32, no tracker, with `timeout_s` as the collective timeout."""
    from distcifar.accelerator import build_accelerator
    from distcifar.config import Config

    cfg = Config()
    cfg.output_dir = output_dir
    cfg.tracking.report_to = "none"
    cfg.train.mixed_precision = "no"
    cfg.train.collective_timeout_s = timeout_s
    return build_accelerator(cfg)
