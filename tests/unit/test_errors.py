"""entry_point in a real process: one line, the exit code, the exit-code file, and the atexit handlers (the output
lock, W&B) run, with and without torch.distributed set up (with it, the process skips the interpreter's teardown)."""

import os
import subprocess
import sys

import pytest

PROGRAM = """
import atexit, sys
import torch.distributed as dist
from distcifar.errors import RunFailed, UsageError, entry_point

marker = sys.argv[1]
atexit.register(lambda: open(marker, "w").write("ran"))
if sys.argv[2] == "distributed":
    dist.init_process_group("gloo", init_method="file://" + marker + ".store", rank=0, world_size=1)

@entry_point
def main():
    raise {error}("{message}")

main()
"""


@pytest.mark.parametrize("setup", ["alone", "distributed"])
@pytest.mark.parametrize(("error", "code"), [("UsageError", 2), ("RunFailed", 1)])
def test_an_error_is_one_line_its_exit_code_and_the_file_and_atexit_handlers_still_run(tmp_path, setup, error, code):
    marker, code_file = tmp_path / "atexit-ran", tmp_path / "exit-code"
    program = PROGRAM.format(error=error, message="the disk is full: free some space")
    result = subprocess.run(
        [sys.executable, "-c", program, str(marker), setup],
        env={**_environment(), "DISTCIFAR_EXIT_CODE_FILE": str(code_file)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == code, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: the disk is full: free some space"
    assert code_file.read_text() == f"{code}\n"
    assert marker.read_text() == "ran"


def _environment() -> dict:
    """This process's environment without a launcher's rank variables (only RANK 0 writes the exit-code file)."""
    return {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
