"""The output lock's verdict on a lock it finds, in the pytest process (the lock under real runs, stale locks and
two runs in one folder included, is in tests/launch/test_faults.py)."""

import json
import time

import pytest

from distcifar.lock import OutputLock


def _found(tmp_path, **fields) -> tuple[OutputLock, dict]:
    """A fresh lock of a run on another node (refreshed just now), as this run finds it."""
    record = {"host": "node-elsewhere", "pid": 4242, "pid_started": 0.0, "slurm_job_id": None, **fields}
    (tmp_path / ".lock").write_text(json.dumps(record))
    return OutputLock(tmp_path), record


@pytest.mark.parametrize(
    "ours, theirs, alive",
    [
        ("3f2a-run", "3f2a-run", False),  # an earlier attempt of this elastic run: its group is gone
        ("3f2a-run", "77aa-other", True),  # another elastic run's, fresh: respected
        ("none", "none", True),  # torchrun's default run id, shared by every job without --rdzv-id: no proof
        (None, None, True),
    ],
)
def test_a_fresh_lock_from_another_node_is_taken_over_only_within_one_elastic_run(
    tmp_path, monkeypatch, ours, theirs, alive
):
    if ours is None:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    else:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", ours)
    lock, record = _found(tmp_path, elastic_run_id=theirs)
    assert time.time() - (tmp_path / ".lock").stat().st_mtime < OutputLock.STALE_S
    assert lock._alive(record) is alive
