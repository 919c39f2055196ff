"""entry_point in a real process: one line, the exit code, the exit-code file, and the atexit handlers (the output
lock, W&B) run, alone and as one of several launched processes (then it skips the interpreter's teardown)."""

import os
import subprocess
import sys

import pytest

PROGRAM = """
import atexit, sys
from distcifar.errors import RunFailed, UsageError, entry_point

marker = sys.argv[1]
atexit.register(lambda: open(marker, "w").write("ran"))

@entry_point
def main():
    raise {error}("{message}")

main()
"""


@pytest.mark.parametrize("world_size", ["1", "2"])  # as the launcher sets it; rank 0 writes the exit-code file
@pytest.mark.parametrize(("error", "code"), [("UsageError", 2), ("RunFailed", 1)])
def test_an_error_is_one_line_its_exit_code_and_file_and_atexit_handlers_run(tmp_path, world_size, error, code):
    marker, code_file = tmp_path / "atexit-ran", tmp_path / "exit-code"
    program = PROGRAM.format(error=error, message="the disk is full: free some space")
    result = subprocess.run(
        [sys.executable, "-c", program, str(marker)],
        env={**_environment(), "DISTCIFAR_EXIT_CODE_FILE": str(code_file), "WORLD_SIZE": world_size},
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
