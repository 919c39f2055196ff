"""Checkpoints in safetensors and JSON only: nothing is pickled, nothing is unpickled.

OUTPUT_DIR/checkpoints/step_00001234/
    model.safetensors      model weights and buffers
    optimizer.safetensors  every per-parameter optimizer tensor ("state.<param index>.<name>")
    rng.safetensors        RNG states of every process ("rank<r>.torch", ".cuda", ".numpy", ".python")
    state.json             run state (step, wall time, best accuracy, tracker run id), world size,
                           resolved config, optimizer hyper-parameters, scheduler, grad scaler
    manifest.json          size and sha256 of each file above; written last

A checkpoint is written to a hidden temporary folder and renamed into place, so a folder named
step_* is always complete; `latest()` still verifies sizes and checksums and skips a damaged one.
Files not listed in the manifest (a planted .pkl, say) are never read. On resume the main process
chooses the checkpoint and every rank must read that same folder: a multi-node run resumes only
from a filesystem shared by all nodes (else every rank stops with one error saying so).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from distcifar.cli import RunFailed, UsageError
from distcifar.config import CheckpointConfig, flatten
from distcifar.engine import RunState, StepReport, check_finite
from distcifar.runtime import agree

FORMAT = "distcifar-checkpoint/2"


class CheckpointError(UsageError):
    """A checkpoint cannot be used (damaged, or made for a different model or data)."""


class CheckpointWriteError(RunFailed):
    """A checkpoint could not be written (a full disk, say); the earlier ones are intact."""


# ---------------------------------------------------------------------------------------------
# Packing state that is not already a flat dict of tensors


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as int64 tensors (fixed shapes, so ranks can be gathered)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, _ = random.getstate()
    state = {
        "torch": torch.get_rng_state().to(torch.int64),
        "numpy": torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([gauss], dtype=torch.float64).view(torch.int64),
        "python": torch.tensor([version, *py_state], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().to(torch.int64)
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8))
    numpy = state["numpy"].tolist()
    gauss = state["numpy_gauss"].view(torch.float64).item()
    np.random.set_state(("MT19937", np.array(numpy[:624], dtype=np.uint32), numpy[624], numpy[625], gauss))
    python = state["python"].tolist()
    random.setstate((python[0], tuple(python[1:]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].to(torch.uint8))


def optimizer_to_files(optimizer_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, per_param in optimizer_state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": optimizer_state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": dict(sorted(state.items())), "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------------------------------
# Files


def _sync_and_describe(path: Path) -> dict:
    """fsync a written file; its size and sha256 for the manifest (read back from the page cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _write(path: Path, data: bytes) -> dict:
    path.write_bytes(data)
    return _sync_and_describe(path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    save_file(tensors, path)  # straight to disk: ~30% faster than serialising to bytes first
    return _sync_and_describe(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_verified(path: Path) -> tuple[dict, dict[str, bytes]]:
    """(manifest, {file name: bytes}) after checking every listed file; raises CheckpointError."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no manifest.json (incomplete checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: manifest.json is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint")
    blobs = {}
    for name, expected in manifest["files"].items():
        if "/" in name or name.startswith("."):
            raise CheckpointError(f"{path}: manifest lists an unsafe file name {name!r}")
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: {name} is missing") from None
        if len(data) != expected["bytes"]:
            raise CheckpointError(
                f"{path}: {name} has {len(data)} bytes, manifest says {expected['bytes']} (truncated?)"
            )
        if hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointError(f"{path}: {name} fails its sha256 check (corrupt)")
        blobs[name] = data
    try:
        json.loads(blobs["state.json"])
    except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: state.json is missing or not valid JSON ({err})") from None
    return manifest, blobs


def step_dirs(root: Path) -> list[Path]:
    """Checkpoint folders under root, newest first."""
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


class Checkpointer:
    """Decides when a save is due, saves and restores the full training state; only the main process writes."""

    def __init__(self, accelerator, root: str | Path, cfg: CheckpointConfig, run_config: dict):
        self.accelerator = accelerator
        self.root = Path(root)
        self.cfg = cfg
        self.run_config = run_config  # the resolved Config as a dict: stored, and checked on resume
        self.saved_step, self.saved_at = -1, time.monotonic()

    def timer_expired(self) -> bool:
        """checkpoint.every_minutes has passed since the last save, on this rank's clock."""
        minutes = self.cfg.every_minutes
        return minutes > 0 and time.monotonic() - self.saved_at >= minutes * 60

    def due(self, state: RunState, report: StepReport, *, epoch_end: bool, last: bool) -> bool:
        """Whether to save after this step: the same answer on every rank (every input is agreed or
        a function of the step)."""
        if state.step == self.saved_step:
            return False
        every = self.cfg.every_steps
        return bool(report.stop_signal or report.timer_due or epoch_end or last or (every and state.step % every == 0))

    def save(self, state: RunState, *, model, optimizer, scheduler, eval_accuracy: float | None = None) -> Path:
        """Collective: every rank must call it (RNG states are gathered to the main process).

        Non-finite weights are never written (engine.TrainingDiverged). A failed write (a full disk, say)
        removes its temporary folder, leaves every earlier checkpoint as it was and raises
        CheckpointWriteError on every rank."""
        acc = self.accelerator
        unwrapped = acc.unwrap_model(model, keep_torch_compile=False)
        check_finite(unwrapped, state.step)
        rng = {name: acc.gather(t.to(acc.device)[None]).cpu() for name, t in rng_state().items()}
        final = self.root / f"step_{state.step:08d}"
        failure = None
        if acc.is_main_process:
            try:
                self._write(final, state, unwrapped, optimizer, scheduler, rng, eval_accuracy)
            except (OSError, SafetensorError) as err:
                failure = err
        if agree(acc, failure is not None)[0]:
            raise CheckpointWriteError(self._describe_failure(final, failure, unwrapped, optimizer))
        if acc.is_main_process:
            self._prune()
        self.saved_step, self.saved_at = state.step, time.monotonic()
        return final

    def _write(self, final: Path, state: RunState, model, optimizer, scheduler, rng, eval_accuracy) -> None:
        acc = self.accelerator
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        opt_tensors, opt_meta = optimizer_to_files(optimizer.state_dict())
        rng_tensors = {f"rank{r}.{name}": t[r].contiguous() for name, t in rng.items() for r in range(len(t))}
        full_state = {
            "run_state": dataclasses.asdict(state),
            "world_size": acc.num_processes,
            "config": self.run_config,
            "optimizer": opt_meta,
            "scheduler": scheduler.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
        }
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            files = {
                "model.safetensors": _write_tensors(tmp / "model.safetensors", weights),
                "optimizer.safetensors": _write_tensors(
                    tmp / "optimizer.safetensors", {k: v.cpu() for k, v in opt_tensors.items()}
                ),
                "rng.safetensors": _write_tensors(tmp / "rng.safetensors", rng_tensors),
                "state.json": _write(tmp / "state.json", json.dumps(full_state, indent=1).encode()),
            }
            manifest = {"format": FORMAT, "step": state.step, "eval_accuracy": eval_accuracy, "files": files}
            _write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
            _fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
            raise
        if final.exists():  # same step saved again (e.g. a new run in an old folder): swap, then delete
            old = self.root / f".old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(self.root)

    def _describe_failure(self, final: Path, failure: Exception | None, model, optimizer) -> str:
        if not self.accelerator.is_main_process:
            return ""  # the main process says it
        needed = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        needed += sum(
            v.numel() * v.element_size()
            for per in optimizer.state_dict()["state"].values()
            for v in per.values()
            if isinstance(v, torch.Tensor)
        )
        try:
            free = f", {shutil.disk_usage(self.root).free / 1e6:.1f} MB free"
        except OSError:
            free = ""
        reason = str(failure).splitlines()[0] if str(failure) else type(failure).__name__
        return (
            f"could not write checkpoint {final.name} to {self.root} ({reason}; it needs about "
            f"{needed / 1e6:.1f} MB{free}). The half-written copy was removed and the earlier checkpoints are "
            "intact: free some space, then run the same command to resume from the newest one"
        )

    def _prune(self) -> None:
        dirs = step_dirs(self.root)
        protected = set(dirs[: self.cfg.keep])
        if self.cfg.keep_best:
            scored = []
            for d in dirs:
                try:
                    scored.append((json.loads((d / "manifest.json").read_text()).get("eval_accuracy") or -1, d))
                except (OSError, json.JSONDecodeError):
                    pass
            if scored:
                protected.add(max(scored, key=lambda s: s[0])[1])
        for d in dirs:
            if d not in protected:
                shutil.rmtree(d, ignore_errors=True)

    def latest(self) -> Path | None:
        """Newest checkpoint that passes verification; damaged ones are reported and skipped."""
        for path in step_dirs(self.root):
            try:
                read_verified(path)
                return path
            except CheckpointError as err:
                if self.accelerator.is_main_process:
                    print(f"warning: skipping damaged checkpoint: {err}", flush=True)
        return None

    def resume(self, resume: str, *, model, optimizer, scheduler) -> RunState:
        """The run state to start from: `resume` is auto (newest good checkpoint, if any), never, or a folder.
        Collective: every rank loads the checkpoint the main process chose, or every rank raises CheckpointError
        (node-local disks: the main process's newest checkpoint is not on the other nodes)."""
        if resume == "never":
            return RunState()
        path = self._chosen_checkpoint(resume)
        if path is None:
            return RunState()
        acc, weights_only = self.accelerator, self.cfg.weights_only
        problem = None
        try:
            if not path.is_dir():
                raise CheckpointError(f"--resume {resume}: no such checkpoint folder (or use auto / never)")
            state = self.load(path, model=model, optimizer=None if weights_only else optimizer, scheduler=scheduler)
        except CheckpointError as err:
            problem = str(err)
        main_failed, failing_rank = (
            int(flag)
            for flag in agree(acc, acc.is_main_process and problem is not None, acc.process_index if problem else -1)
        )
        if main_failed:
            raise CheckpointError(problem if acc.is_main_process else "")
        if failing_rank >= 0:
            where = "output_dir" if resume == "auto" else f"--resume {resume}"
            raise CheckpointError(
                f"rank {failing_rank} cannot read checkpoint {path} (missing or damaged on its node), which the main "
                f"process resumes from: to resume a multi-node run, {where} must be on a filesystem shared by all "
                "nodes (or pass --resume never, or --resume a checkpoint folder every node can read)"
                if acc.is_main_process
                else ""
            )
        if acc.is_main_process:
            print(f"resumed from {path} at step {state.step}{' (weights only)' if weights_only else ''}", flush=True)
        if weights_only:
            return RunState()
        self.saved_step = state.step
        return state

    def _chosen_checkpoint(self, resume: str) -> Path | None:
        """--resume PATH, or with `auto` the newest good checkpoint as the main process sees it, told to every rank."""
        if resume != "auto":
            return Path(resume)
        newest = self.latest() if self.accelerator.is_main_process else None
        chosen = [newest.name if newest else None]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(chosen)
        return None if chosen[0] is None else self.root / chosen[0]

    def load(self, path: Path, *, model, optimizer=None, scheduler=None) -> RunState:
        """Restore into model and, unless optimizer is None (weights only), the optimizer, scheduler,
        grad scaler and this rank's RNG. Raises CheckpointError."""
        _, blobs = read_verified(Path(path))
        saved = json.loads(blobs["state.json"])
        missing = [key for key in STATE_FIELDS if key not in saved]
        if missing:
            raise CheckpointError(
                f"{path}: state.json has no field '{missing[0]}' (made by another program or edited by hand?)"
            )
        check_compatible(saved["config"], self.run_config, weights_only=optimizer is None)
        model = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        load_fitting(path, model, load(blobs["model.safetensors"]))
        try:
            state = RunState(**saved["run_state"])
        except TypeError as err:
            raise CheckpointError(f"{path}: state.json's run_state does not fit this version ({err})") from None
        if optimizer is None:
            return state
        optimizer.load_state_dict(optimizer_from_files(load(blobs["optimizer.safetensors"]), saved["optimizer"]))
        # The files hold NCHW-contiguous tensors: give each state tensor (momentum, Adam moments) its parameter's
        # layout back (channels_last), or the foreach/fused update leaves its fast path for the rest of the run.
        for param, per_param in optimizer.state.items():
            for name, value in per_param.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                    per_param[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)
        scheduler.load_state_dict(saved["scheduler"])
        if self.accelerator.scaler is not None and saved.get("scaler"):
            self.accelerator.scaler.load_state_dict(saved["scaler"])
        rng = load(blobs["rng.safetensors"])
        rank = self.accelerator.process_index
        if saved["world_size"] == self.accelerator.num_processes:
            set_rng_state({k.split(".", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{rank}.")})
        else:  # a different world size cannot continue each rank's RNG stream; derive a fresh one
            torch.manual_seed(self.run_config["train"]["seed"] * 7919 + state.step * 31 + rank)
        return state


STATE_FIELDS = ("run_state", "world_size", "config", "optimizer", "scheduler")


def load_fitting(path, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load `tensors` into `model`, or raise CheckpointError naming the first tensor that does not fit."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: model.safetensors has no tensor '{name}' (a checkpoint of another model?)")
        if tensors[name].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, the model expects "
                f"{tuple(tensor.shape)} (a checkpoint of another model?)"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: model.safetensors has a tensor '{unexpected[0]}' that the model does not have")
    model.load_state_dict(tensors)


# Fields that must match to continue a run; data.path and data.cache_dir may move between machines.
RESUME_MUST_MATCH = ("model", "data", "train.batch_size", "train.seed")
WHERE_DATA_LIVES = ("data.path", "data.cache_dir")


def check_compatible(saved: dict, current: dict, weights_only: bool) -> None:
    """Raise CheckpointError naming every field that differs between the saved and current config."""
    must_match = ("model",) if weights_only else RESUME_MUST_MATCH
    saved_flat, current_flat = flatten(saved), flatten(current)
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
