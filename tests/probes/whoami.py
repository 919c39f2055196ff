"""What a launcher set up, seen from each process (for runs by hand, e.g. under srun or a new launcher):

    <launcher> tests/probes/whoami.py

Each process prints one line `WHOAMI {...}`: its pid, the launcher's variables, and the world size, rank and
distributed type runtime.build_accelerator made of them (its refusals included).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support (which adds the repository)
from support import probe_accelerator  # noqa: E402


def main() -> None:
    """One line per process: what the launcher set and what runtime.build_accelerator made of it."""
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    accelerator = probe_accelerator("whoami_run")
    print(
        "WHOAMI "
        + json.dumps(
            {
                "pid": os.getpid(),
                "env": env,
                "num_processes": accelerator.num_processes,
                "process_index": accelerator.process_index,
                "distributed_type": str(accelerator.distributed_type),
            }
        ),
        flush=True,
    )
    accelerator.end_training()


if __name__ == "__main__":
    main()
