"""Restart trials: the same crash, many times. Each trial launches a 2-process run of the tiny network on synthetic
data (tests/support's train_args) under torch elastic with one restart allowed, SIGKILLs rank 1 at a random
moment after the checkpoint of step 6 (mid-step, mid-save or mid-evaluation), and checks that the job finishes by
itself with exit code 0, final weights bit-identical to an uninterrupted run, and each step once in metrics.jsonl.

    python scripts/restart_trials.py [--trials 20] [--launcher torchrun|accelerate] [--output results.json]

Exit code 0 when every trial passed. CPU only; a trial takes 40-150 s on 2 cores, depending on what else runs.
tests/launch/test_restarts.py runs one trial of each kind in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from support import (  # noqa: E402
    RESTART_ARGS,
    RESTART_TOTAL_STEPS,
    TORCHRUN,
    TRAIN,
    accelerate_launch,
    finish,
    launch_command,
    read_metrics,
    run,
    sigkill_rank_after,
    start,
    train_args,
    write_parquet_dataset,
)


def launcher(name: str) -> list[str]:
    if name == "torchrun":
        return [TORCHRUN, "--standalone", "--nproc_per_node", "2", "--max-restarts", "1", str(TRAIN)]
    return [*accelerate_launch("cpu_multi.yaml", "--max_restarts", "1"), str(TRAIN)]


def trial(number: int, name: str, root: Path, data: Path, reference: dict, delay_s: float, timeout: float) -> dict:
    out = root / f"trial{number:02d}"
    began = time.monotonic()
    process = start(launcher(name) + train_args(out, data, *RESTART_ARGS), None, True)
    try:
        sigkill_rank_after(process, out / "checkpoints" / "step_00000006", rank=1, delay_s=delay_s)
        killed = True
    except AssertionError:  # the run ended or stalled before its checkpoint: a failed trial, said below
        killed = False
    code, stdout, stderr = finish(process, timeout)
    result = {"trial": number, "launcher": name, "delay_s": round(delay_s, 2), "killed": killed, "exit_code": code}
    result["seconds"] = round(time.monotonic() - began)
    result["timed_out"] = "[test] killed after" in stderr
    resumed = re.findall(r"resumed from \S+ at step (\d+)", stdout)
    result["resumed_at"] = int(resumed[0]) if len(resumed) == 1 else None
    final = out / "final" / "model.safetensors"
    if final.exists():
        weights = load_file(final)
        result["bit_identical"] = all(torch.equal(reference[k], weights[k]) for k in reference)
        steps = [row["step"] for row in read_metrics(out) if "train/loss" in row]
        result["each_step_once"] = steps == list(range(1, RESTART_TOTAL_STEPS + 1))
    result["passed"] = bool(
        killed and code == 0 and result["resumed_at"] and result.get("bit_identical") and result.get("each_step_once")
    )
    if not result["passed"]:
        (root / f"trial{number:02d}.log").write_text(stdout + "\n--- stderr ---\n" + stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="restart_trials.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--launcher", choices=["torchrun", "accelerate"], default="torchrun")
    parser.add_argument("--seed", type=int, default=0, help="of the random kill delays")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a trial may take before it counts as hung")
    parser.add_argument("--output", help="write the results here as JSON")
    parser.add_argument("--keep", help="a folder to keep the runs in (default: a temporary one, removed)")
    args = parser.parse_args()
    delays = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="distcifar-restarts-") as scratch:
        root = Path(args.keep or scratch)
        data = write_parquet_dataset(root / "data")
        run(launch_command(2) + train_args(root / "uninterrupted", data, *RESTART_ARGS), timeout=args.timeout)
        reference = load_file(root / "uninterrupted" / "final" / "model.safetensors")
        results = []
        for number in range(1, args.trials + 1):
            results.append(trial(number, args.launcher, root, data, reference, delays.uniform(0, 2), args.timeout))
            print(json.dumps(results[-1]), flush=True)
    passed = sum(result["passed"] for result in results)
    summary = {"launcher": args.launcher, "trials": len(results), "passed": passed, "results": results}
    print(f"{passed} of {len(results)} trials finished by themselves, bit-identical ({args.launcher})")
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1))
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
