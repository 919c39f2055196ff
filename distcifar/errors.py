"""Every error a user can meet, its exit code, and the wrapper that turns one into a single line.

Two kinds, two exit codes:

    UsageError (exit 2)  the user asked for something that cannot be done as given: a config mistake, a
                         dataset or checkpoint that does not fit, an output folder in use. Nothing ran.
    RunFailed  (exit 1)  the run met a fault it can name (divergence, a full disk, a failed upload);
                         nothing good was lost.

Every entry point (train, evaluate, benchmark, plot) runs its main() through `entry_point`, which prints
`error: <message>` on stderr and exits with the code. An error raised with an empty message is one that
another rank states: only the main process prints it (distcifar.ranks.fail_together).
"""

from __future__ import annotations

import atexit
import functools
import os
import sys

EXIT_FAILED, EXIT_USAGE = 1, 2
EXIT_CODE_FILE = "DISTCIFAR_EXIT_CODE_FILE"


class UsageError(Exception):
    """The user asked for something that cannot be done as given (exit code 2)."""


class RunFailed(Exception):
    """The run met a fault it can name (divergence, a full disk); nothing good was lost (exit code 1)."""


class ConfigError(UsageError):
    """A mistake in the configuration or the command line."""


class DataError(UsageError):
    """The dataset cannot be used as given."""


class CheckpointError(UsageError):
    """A checkpoint cannot be used (damaged, or made for a different model or data)."""


class CheckpointWriteError(RunFailed):
    """A checkpoint could not be written (a full disk, say); the earlier ones are intact."""


class TrainingDiverged(RunFailed):
    """The loss or the weights are no longer finite."""


DIVERGED_HINT = "lower optim.lr or set optim.grad_clip (e.g. 1.0), then start again or resume from a checkpoint"


class PushUnavailable(UsageError):
    """--push_to_hub cannot work in this environment (offline, no token); said before training starts."""


class PushFailed(RunFailed):
    """The upload failed; the run and its local export are complete."""


def one_line(text: object, limit: int | None = None) -> str:
    """`text` (an exception's message, say) with every run of whitespace collapsed to one space, cut to `limit`."""
    collapsed = " ".join(str(text).split())
    return collapsed[:limit] if limit else collapsed


def entry_point(main):
    """Run main(); a UsageError becomes one line on stderr and exit code 2, a RunFailed exit code 1.

    accelerate launch exits with 1 whatever its workers' codes, so the main process (RANK 0 or no
    launcher) also writes its code to the file $DISTCIFAR_EXIT_CODE_FILE names, when set
    (slurm/train.sh sets it and exits with that code)."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UsageError, RunFailed) as err:
            if str(err):  # empty: another rank follows the main process's error, which says it once
                print(f"error: {err}", file=sys.stderr, flush=True)
            code = EXIT_USAGE if isinstance(err, UsageError) else EXIT_FAILED
            path = os.environ.get(EXIT_CODE_FILE)
            if path and os.environ.get("RANK", "0") == "0":
                try:
                    with open(path, "w") as file:
                        file.write(f"{code}\n")
                except OSError:  # not on the launching host: the launcher's code stands
                    pass
            exit_process(code)

    return run


def exit_process(code: int) -> None:
    """Exit with `code`; in a run of several processes, without the interpreter's own teardown.

    With several processes (the launcher's WORLD_SIZE > 1: Accelerator.end_training has destroyed the process group
    by now) the atexit handlers run (the output lock, W&B) and the process ends with os._exit, because tearing
    down torch.distributed's C++ state at interpreter exit can abort (SIGABRT) or outlast the launcher's patience,
    and the launcher would then report that instead of the run's code (docs/design.md). Code 0 in one
    process returns."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
