"""Profiler traces of chosen optimizer steps (train.profile_steps A:B).

torch.profiler records optimizer steps A to B and nothing else: it starts before step A and stops after step B,
outside the steps' clock, and every other step runs unprofiled. Each recorded step is one range named
"optimizer step N" in the trace. The main process (every process with train.profile_all_ranks) writes
OUTPUT_DIR/profile/rank<R>.steps_<A>-<B>.pt.trace.json (Chrome trace format, which https://ui.perfetto.dev and
TensorBoard's profiler plugin open) and a table of the top operators by self time beside it; the main process also
prints its table. Recorded: CPU (and on a GPU CUDA) activity, operator input shapes and memory allocations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from distcifar.config import Config
from distcifar.engine import Progress, StepReport
from distcifar.hardware import wait_for_device
from distcifar.ranks import print_once

STEP_LABEL = "optimizer step {}"
TOP_OPERATORS = 15


def profiled(
    steps: Iterator[StepReport], cfg: Config, progress: Progress, accelerator, output_dir: Path
) -> Iterator[StepReport]:
    """The items of `steps` (engine.optimizer_steps, which advances `progress`) with the steps of train.profile_steps
    recorded. Close it when done: a run stopped inside the window then still writes what was recorded."""
    window = cfg.train.profile_window
    if window is None or not (accelerator.is_main_process or cfg.train.profile_all_ranks):
        yield from steps
        return
    first, last = window
    recorder, recorded = None, []
    try:
        while True:
            step = progress.step + 1  # the step the next item takes
            if recorder is None and not recorded and first <= step <= last:  # a resumed run: what is left of it
                recorder = _start(accelerator.device)
            with record_function(STEP_LABEL.format(step)) if recorder else contextlib.nullcontext():
                report = next(steps, None)
            if report is None:
                return
            if recorder:
                recorded.append(step)
                if step >= last:
                    _write(recorder, recorded, accelerator, output_dir)
                    recorder = None
            yield report
    finally:
        if recorder:
            _write(recorder, recorded, accelerator, output_dir)


def _start(device: torch.device) -> profile:
    wait_for_device(device)  # on a GPU: the earlier steps' queued kernels stay out of the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    recorder = profile(activities=activities, record_shapes=True, profile_memory=True)
    recorder.start()
    return recorder


def _write(recorder: profile, recorded: list[int], accelerator, output_dir: Path) -> None:
    recorder.stop()  # on a GPU this waits for the recorded kernels
    folder = output_dir / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"rank{accelerator.process_index}.steps_{recorded[0]}-{recorded[-1]}"
    trace = folder / f"{name}.pt.trace.json"
    recorder.export_chrome_trace(str(trace))
    by = "self_device_time_total" if accelerator.device.type == "cuda" else "self_cpu_time_total"
    table = recorder.key_averages().table(sort_by=by, row_limit=TOP_OPERATORS)
    (folder / f"{name}.top_operators.txt").write_text(table + "\n")
    print_once(
        f"profile of steps {recorded[0]}-{recorded[-1]}: {trace} (open it in https://ui.perfetto.dev, or "
        f"`tensorboard --logdir {folder}` with torch-tb-profiler installed); top operators by "
        f"{by.replace('_', ' ')}:\n{table}"
    )
