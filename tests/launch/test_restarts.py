"""In-job restarts under torch elastic, for real: a 2-process run whose rank 1 is SIGKILLed (torchrun
--max-restarts 1) or stops answering (accelerate launch --max_restarts 1) is restarted by its launcher, resumes
from the newest checkpoint by itself and ends with weights bit-identical to an uninterrupted run, each step once
in metrics.jsonl, the restart recorded as the run's second attempt and W&B continuing one run. One trial each
here, at a chosen step (tests/probes/instrumented_train.py kills or stalls rank 1); scripts/restart_trials.py runs
20 in a row, SIGKILLed from outside at random moments. The same within a Slurm allocation is in test_slurm.py."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from distcifar.files import read_jsonl
from distcifar.tracking import ATTEMPTS_FILE
from support import (
    RESTART_ARGS,
    RESTART_TOTAL_STEPS,
    TORCHRUN,
    accelerate_launch,
    finish,
    launch_command,
    offline_runs,
    probe,
    read_metrics,
    run,
    start,
    train_args,
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_data):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(launch_command(2) + train_args(out, synthetic_data, *RESTART_ARGS))
    return load_file(out / "final" / "model.safetensors")


def _assert_finished_as_if_uninterrupted(out, output: str, uninterrupted: dict) -> int:
    """The restarted run's own evidence: it resumed from a checkpoint of the dead attempt (not from step 0), each
    step is in metrics.jsonl once, the lock is released, and the weights are the uninterrupted run's. The step it
    resumed from."""
    resumed = re.findall(rf"resumed from {re.escape(str(out / 'checkpoints'))}/step_\d+ at step (\d+)", output)
    assert len(resumed) == 1 and int(resumed[0]) > 0, output[-4000:]
    assert [row["step"] for row in read_metrics(out) if "train/loss" in row] == list(range(1, RESTART_TOTAL_STEPS + 1))
    assert not (out / ".lock").exists()
    weights = load_file(out / "final" / "model.safetensors")
    different = [name for name in uninterrupted if not torch.equal(uninterrupted[name], weights[name])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"
    # attempts.jsonl: the launcher's restart is the run's second attempt, from the step it resumed from, to the end
    attempts = read_jsonl(out / ATTEMPTS_FILE)
    assert [(row["attempt"], row["from_step"]) for row in attempts if "started" in row] == [
        (1, 0),
        (2, int(resumed[0])),
    ]
    assert {"attempt": 2, "at_step": RESTART_TOTAL_STEPS, "exit_code": 0}.items() <= attempts[-1].items()
    return int(resumed[0])


def test_torchrun_restarts_a_sigkilled_rank_and_finishes_bit_identical(tmp_path, synthetic_data, uninterrupted):
    # rank 1 SIGKILLs itself after step 11 (first attempt only): the newest checkpoint is step 9's, and rank 0 has
    # logged steps 10 and 11 already, which the restart must not show twice
    out = tmp_path / "run"
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", probe("instrumented_train")]
    kill = {"PROBE_FAIL_RANK": "1", "PROBE_FAIL_STEP": "11", "PROBE_KILL": "1"}
    args = train_args(out, synthetic_data, *RESTART_ARGS, "--tracking.report_to", "wandb")
    code, stdout, stderr = finish(start(command + args, {**os.environ, **kill}, True), 400)
    assert code == 0, (stdout + stderr)[-6000:]
    assert "exitcode: -9" in stderr  # the launcher saw the SIGKILL
    assert _assert_finished_as_if_uninterrupted(out, stdout, uninterrupted) == 9
    # W&B: the restart continues the killed attempt's run (one id) from the step after the checkpoint
    first, second = offline_runs(out, 2)
    assert first["id"] == second["id"]
    assert max(first["history"]) == 11  # what the killed attempt logged past its checkpoint...
    assert min(second["history"]) == 10 and max(second["history"]) == RESTART_TOTAL_STEPS  # ...is logged again


def test_accelerate_restarts_a_rank_that_stops_answering_after_the_collective_timeout(
    tmp_path, synthetic_data, uninterrupted
):
    # rank 1 sleeps from its 8th step on (in the first attempt only): rank 0 waits in the next all-reduce until
    # the 20 s collective timeout ends it, and the launcher restarts the group
    out = tmp_path / "run"
    command = [*accelerate_launch("cpu_multi.yaml", "--max_restarts", "1"), probe("instrumented_train")]
    hang = {"PROBE_FAIL_RANK": "1", "PROBE_FAIL_STEP": "8", "PROBE_HANG": "1"}
    args = train_args(out, synthetic_data, *RESTART_ARGS, "--train.collective_timeout_s", "20")
    code, stdout, stderr = finish(start(command + args, {**os.environ, **hang}, True), 500)
    assert code == 0, (stdout + stderr)[-6000:]
    assert "rank 1 stops answering at step 8" in stderr
    _assert_finished_as_if_uninterrupted(out, stdout, uninterrupted)
    assert json.loads((out / "summary.json").read_text())["global_step"] == RESTART_TOTAL_STEPS
