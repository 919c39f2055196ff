"""Whether the local Slurm test cluster answers."""

from __future__ import annotations

import shutil
import subprocess


def slurm_answers() -> bool:
    """A Slurm cluster is up: sbatch/srun are installed and sinfo answers."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None or shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
