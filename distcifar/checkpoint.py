"""The checkpointer: given the run's model, optimizer, scheduler and average once, it saves them with the run state
it is handed at each save, keeps the newest (and best) checkpoints, and resumes. When a save is due is the
cadence's business (cadence.py), the files themselves checkpoint_format.py's.

On resume the main process chooses the checkpoint and every rank must read that same folder: a multi-node
run resumes only from a filesystem shared by all nodes (else every rank stops with one error saying so).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from distcifar import checkpoint_format as files
from distcifar.config import CheckpointConfig, Config, flatten
from distcifar.errors import DIVERGED_HINT, CheckpointError, CheckpointWriteError, TrainingDiverged, one_line
from distcifar.ranks import decided_by_main_process, fail_together, max_over_ranks

if TYPE_CHECKING:
    from distcifar.engine import Training

# Fields that must match to continue a run; data.path and data.cache_dir may move between machines.
RESUME_MUST_MATCH = ("model", "data", "train.batch_size", "train.seed")
WHERE_DATA_LIVES = ("data.path", "data.cache_dir")


class Checkpointer:
    """Saves and restores the full training state of one run; only the main process writes.

    The run state (what the components besides the tensors carry: the engine's progress, the validator's best
    accuracy and target, the tracker's run id) is handed to `save` as one flat dict and handed back by `resume`;
    the checkpointer only stores it."""

    def __init__(
        self,
        accelerator,
        root: str | Path,
        cfg: CheckpointConfig,
        run_config: dict,
        *,
        model,
        optimizer,
        scheduler,
        ema=None,
    ):
        self.accelerator = accelerator
        self.root = Path(root)
        self.cfg = cfg
        self.run_config = run_config  # the resolved Config as a dict: stored, and checked on resume
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.ema = ema  # the run's AveragedModel (train.ema_decay), or None
        self.saved_step, self.saved_at = -1, time.monotonic()

    @classmethod
    def for_run(cls, accelerator, cfg: Config, training: Training) -> Checkpointer:
        """The checkpointer of a run that train.py or the benchmark built: OUTPUT_DIR/checkpoints."""
        return cls(
            accelerator,
            Path(cfg.output_dir) / "checkpoints",
            cfg.checkpoint,
            cfg.to_dict(),
            model=training.model,
            optimizer=training.optimizer,
            scheduler=training.scheduler,
            ema=training.ema,
        )

    # -- when ------------------------------------------------------------------------------------

    def timer_expired(self) -> bool:
        """checkpoint.every_minutes has passed since the last save, on this rank's clock."""
        minutes = self.cfg.every_minutes
        return minutes > 0 and time.monotonic() - self.saved_at >= minutes * 60

    # -- saving ----------------------------------------------------------------------------------

    def save(self, step: int, run_state: dict, eval_accuracy: float | None = None) -> Path | None:
        """Save the run at `step` with `run_state` (never twice at one step: None then). Collective: every rank
        must call it (RNG states are gathered to the main process).

        Non-finite weights are never written (TrainingDiverged). A failed write (a full disk, say)
        removes its temporary folder, leaves every earlier checkpoint as it was and raises
        CheckpointWriteError on every rank."""
        if step == self.saved_step:  # the step resumed from, say
            return None
        acc = self.accelerator
        model = acc.unwrap_model(self.model, keep_torch_compile=False)
        check_finite(model, step)
        rng = {name: acc.gather(t.to(acc.device)[None]).cpu() for name, t in files.rng_state().items()}
        final = self.root / f"step_{step:08d}"
        failure = None
        if acc.is_main_process:
            try:
                self._write(final, model, rng, {**run_state, "step": step}, eval_accuracy)
            except (OSError, SafetensorError) as err:
                failure = self._describe_failure(final, err, model)
        fail_together(acc, CheckpointWriteError, failure)
        if acc.is_main_process:
            self._prune()
        self.saved_step, self.saved_at = step, time.monotonic()
        return final

    def _write(self, final: Path, model: torch.nn.Module, rng: dict[str, torch.Tensor], run_state: dict, eval_accuracy):
        acc = self.accelerator
        optimizer_tensors, optimizer_meta = files.optimizer_to_files(self.optimizer.state_dict())
        tensor_files = {
            "model.safetensors": {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
            "optimizer.safetensors": {k: v.cpu() for k, v in optimizer_tensors.items()},
            "rng.safetensors": {f"rank{r}.{name}": t[r].contiguous() for name, t in rng.items() for r in range(len(t))},
        }
        if self.ema is not None:  # the AveragedModel whole: its network ("module.*") and its counter "n_averaged"
            tensor_files["ema.safetensors"] = {
                k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()
            }
        state = {
            "run_state": run_state,
            "world_size": acc.num_processes,
            "config": self.run_config,
            "optimizer": optimizer_meta,
            "scheduler": self.scheduler.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        }
        numbers = [files.sequence(path) for path in files.step_dirs(self.root)]
        sequence = 1 + max((n for n in numbers if n is not None), default=0)  # this save is the newest
        manifest = {"step": run_state["step"], "eval_accuracy": eval_accuracy, "sequence": sequence}
        files.write(final, tensor_files, state, manifest)

    def _describe_failure(self, final: Path, failure: Exception, model: torch.nn.Module) -> str:
        needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        needed += sum(
            v.numel() * v.element_size()
            for per in self.optimizer.state_dict()["state"].values()
            for v in per.values()
            if isinstance(v, torch.Tensor)
        )
        try:
            free = f", {shutil.disk_usage(self.root).free / 1e6:.1f} MB free"
        except OSError:
            free = ""
        reason = one_line(failure, 200) or type(failure).__name__
        return (
            f"could not write checkpoint {final.name} to {self.root} ({reason}; it needs about "
            f"{needed / 1e6:.1f} MB{free}). The half-written copy was removed and the earlier checkpoints are "
            "intact: free some space, then run the same command to resume from the newest one"
        )

    def _prune(self) -> None:
        """Keep the newest checkpoint.keep checkpoints (the most recently saved, whatever their step: a new run's
        lower steps are kept over an older run's higher ones) and, with keep_best, the best evaluated one."""
        dirs = files.step_dirs(self.root)
        protected = set(dirs[: self.cfg.keep])
        if self.cfg.keep_best and dirs:
            protected.add(max(dirs, key=lambda d: files.manifest_field(d, "eval_accuracy") or -1))
        for d in dirs:
            if d not in protected:
                shutil.rmtree(d, ignore_errors=True)

    # -- resuming --------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        """Newest checkpoint that passes verification; damaged ones are reported and skipped."""
        for path in files.step_dirs(self.root):
            try:
                files.read_verified(path)
                return path
            except CheckpointError as err:
                if self.accelerator.is_main_process:
                    print(f"warning: skipping damaged checkpoint: {err}", flush=True)
        return None

    def resume(self, how: str) -> dict:
        """The run state to continue from ({} for a new run): `how` is auto (newest good checkpoint, if any), never,
        or a folder; with checkpoint.weights_only only the weights are loaded and the run is new. Collective: every
        rank loads the checkpoint the main process chose, or every rank raises CheckpointError (node-local disks: the
        main process's newest checkpoint is not on the other nodes)."""
        if self.accelerator.is_main_process:  # this run holds the folder's lock: no other run is saving here
            for leftover in files.remove_dead_temporaries(self.root):
                print(f"removed {leftover}, left behind by a save that was killed", flush=True)
        path = None if how == "never" else self._chosen_checkpoint(how)
        if path is None:
            return {}
        acc, weights_only = self.accelerator, self.cfg.weights_only
        problem = None
        try:
            if not path.is_dir():
                raise CheckpointError(f"--resume {how}: no such checkpoint folder (or use auto / never)")
            state = self.load(path, weights_only=weights_only)
        except CheckpointError as err:
            problem = str(err)
        main_failed, failing_rank = (
            int(flag)
            for flag in max_over_ranks(acc, acc.is_main_process and bool(problem), acc.process_index if problem else -1)
        )
        if main_failed:
            fail_together(acc, CheckpointError, problem or "", same_on_every_rank=True)
        if failing_rank >= 0:
            where = "output_dir" if how == "auto" else f"--resume {how}"
            fail_together(
                acc,
                CheckpointError,
                f"rank {failing_rank} cannot read checkpoint {path} (missing or damaged on its node), which the main "
                f"process resumes from: to resume a multi-node run, {where} must be on a filesystem shared by all "
                "nodes (or pass --resume never, or --resume a checkpoint folder every node can read)",
                same_on_every_rank=True,
            )
        if acc.is_main_process:
            print(f"resumed from {path} at step {state['step']}{' (weights only)' if weights_only else ''}", flush=True)
        if weights_only:
            return {}
        self.saved_step = state["step"]
        return state

    def _chosen_checkpoint(self, how: str) -> Path | None:
        """--resume PATH, or with `auto` the newest good checkpoint as the main process sees it, told to every rank."""
        if how != "auto":
            return Path(how)
        newest = decided_by_main_process(self.accelerator, lambda: getattr(self.latest(), "name", None))
        return None if newest is None else self.root / newest

    def load(self, path: Path, *, weights_only: bool = False) -> dict:
        """Restore the model and, unless `weights_only`, the optimizer, scheduler, grad scaler and this rank's RNG;
        the checkpoint's run state. Raises CheckpointError."""
        _, blobs = files.read_verified(Path(path))
        saved = files.read_state(path, blobs)
        check_compatible(saved["config"], self.run_config, weights_only=weights_only)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        files.load_fitting(path, model, load(blobs["model.safetensors"]))
        state = saved.get("run_state")
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise CheckpointError(f"{path}: state.json's run_state does not fit this version (no step in {state!r})")
        if weights_only:
            return state
        files.restore_optimizer(self.optimizer, load(blobs["optimizer.safetensors"]), saved["optimizer"])
        self._load_average(path, blobs)
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.accelerator.scaler is not None and saved.get("scaler"):
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        rng = load(blobs["rng.safetensors"])
        rank = self.accelerator.process_index
        if saved["world_size"] == self.accelerator.num_processes:
            files.set_rng_state({k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{rank}.")})
        else:  # a different world size cannot continue each rank's RNG stream; derive a fresh one
            torch.manual_seed(self.run_config["train"]["seed"] * 7919 + state["step"] * 31 + rank)
        return state

    def _load_average(self, path: Path, blobs: dict[str, bytes]) -> None:
        """Restore the weight average (train.ema_decay) from ema.safetensors. A checkpoint without one (made with the
        average off) starts it afresh: its first update copies the resumed weights. Without train.ema_decay the file
        is left unread."""
        if self.ema is None:
            return
        if "ema.safetensors" in blobs:
            files.load_fitting(path, self.ema, load(blobs["ema.safetensors"]), "ema.safetensors")
            return
        self.ema.n_averaged.zero_()
        if self.accelerator.is_main_process:
            print(f"{path} holds no weight average: train.ema_decay starts it from the resumed weights", flush=True)


def check_finite(model: torch.nn.Module, step: int) -> None:
    """Raise TrainingDiverged if any weight or buffer is NaN or infinite (one host sync)."""
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    if not torch.stack([t.isfinite().all() for t in floats]).all():
        raise TrainingDiverged(
            f"training diverged by step {step}: the weights hold NaN or infinite values; {DIVERGED_HINT}"
        )


def check_compatible(saved: dict, current: dict, weights_only: bool) -> None:
    """Raise CheckpointError naming every field that differs between the saved and current config."""
    must_match = ("model",) if weights_only else RESUME_MUST_MATCH
    # A field added since the checkpoint was made had its default then: distcifar adds a field only with a default
    # that keeps earlier runs as they were (data.crop_padding_mode zeros, say).
    saved_flat, current_flat = {**flatten(Config().to_dict()), **flatten(saved)}, flatten(current)
    differing = [
        f"{key} (checkpoint {saved_flat.get(key)!r}, now {current_flat.get(key)!r})"
        for key in sorted(set(saved_flat) | set(current_flat))
        if any(key == m or key.startswith(m + ".") for m in must_match)
        and key not in WHERE_DATA_LIVES
        and saved_flat.get(key) != current_flat.get(key)
    ]
    if differing:
        hint = "" if weights_only else "; to start a new run from its weights add --checkpoint.weights_only true"
        raise CheckpointError(f"the checkpoint was made with a different config: {'; '.join(differing)}{hint}")
