"""train.py under a real launcher, unchanged but for instruments set by environment.

    <launcher> tests/probes/instrumented_train.py [train.py ARGS ...]

It runs distcifar.train.main() itself; the step generator it drives, engine.optimizer_steps (as train.py
imports it), is wrapped, not replaced:
  PROBE_DUMP_DIR=DIR               each rank saves its final model state (weights and buffers) to
                                   DIR/rank<R>.safetensors when train.py calls end_training()
  PROBE_FAIL_RANK=R PROBE_FAIL_STEP=S
                                   rank R raises RuntimeError after its S-th optimizer step (1-based):
                                   a crash on one rank only
  PROBE_KILL=1 (with PROBE_FAIL_RANK/STEP)
                                   instead of raising, that rank SIGKILLs itself after that step (its
                                   collectives done, before the checkpointer sees the step): an OOM kill
  PROBE_HANG=1 (with PROBE_FAIL_RANK/STEP)
                                   instead of raising, that rank stops answering (sleeps, SIGTERM
                                   included) at that step: a stuck rank rather than a crashed one
Under torch elastic the crash or hang happens in the first attempt only (TORCHELASTIC_RESTART_COUNT 0): the
restarted group runs clean, as after a real fault.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support (which adds the repository)
import support  # noqa: E402, F401  (for the repository on sys.path)

FAIL_MESSAGE = "instrumented_train: injected failure on rank {rank} at step {step} (unix time {time:.3f})"


def main(argv: list[str]) -> None:
    from accelerate import Accelerator

    import distcifar.train as train

    dump_dir = os.environ.get("PROBE_DUMP_DIR")
    fail_rank = os.environ.get("PROBE_FAIL_RANK")
    if dump_dir:
        end_training = Accelerator.end_training

        def dump_then_end_training(self):
            from safetensors.torch import save_file

            model = self.unwrap_model(self._models[0])
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            Path(dump_dir).mkdir(parents=True, exist_ok=True)
            save_file(state, str(Path(dump_dir) / f"rank{self.process_index}.safetensors"))
            return end_training(self)

        Accelerator.end_training = dump_then_end_training
    if fail_rank is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        fail_rank, fail_step = int(fail_rank), int(os.environ.get("PROBE_FAIL_STEP", "1"))
        optimizer_steps = train.optimizer_steps

        def failing_optimizer_steps(accelerator, *args, **kwargs):
            for count, report in enumerate(optimizer_steps(accelerator, *args, **kwargs), start=1):
                if accelerator.process_index == fail_rank and count == fail_step:
                    if os.environ.get("PROBE_KILL"):
                        os.kill(os.getpid(), signal.SIGKILL)
                    if os.environ.get("PROBE_HANG"):
                        print(
                            f"instrumented_train: rank {fail_rank} stops answering at step {fail_step} "
                            f"(unix time {time.time():.3f})",
                            file=sys.stderr,
                            flush=True,
                        )
                        while True:
                            time.sleep(60)
                    raise RuntimeError(FAIL_MESSAGE.format(rank=fail_rank, step=fail_step, time=time.time()))
                yield report

        train.optimizer_steps = failing_optimizer_steps
    train.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
