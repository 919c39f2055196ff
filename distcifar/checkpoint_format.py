"""The checkpoint format: safetensors and JSON only, nothing pickled, nothing unpickled.

OUTPUT_DIR/checkpoints/step_00001234/
    model.safetensors      model weights and buffers
    optimizer.safetensors  every per-parameter optimizer tensor ("state.<param index>.<name>")
    rng.safetensors        RNG states of every process ("rank<r>.torch", ".cuda", ".numpy", ".python")
    ema.safetensors        with train.ema_decay only: the weight average ("module.<name>" as in model.safetensors,
                           and its update counter "n_averaged")
    state.json             run state (step, wall time, best accuracy, tracker run id), world size,
                           resolved config, optimizer hyper-parameters, scheduler, grad scaler
    manifest.json          size and sha256 of each file above, and the save's sequence number; written last

`write` puts a checkpoint in a hidden temporary folder (.tmp-step_*-HOST-PID) and renames it into place, so a
folder named step_* is always complete (`remove_dead_temporaries` removes what a killed save left behind);
`read_verified` still checks sizes and checksums, and reads no file that the manifest does not list (a planted
.pkl, say). When a save is due, what goes in, and how a run resumes
is checkpoint.py's business (the policy); this module only packs, writes, verifies and loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import socket
from pathlib import Path

import numpy as np
import psutil
import torch
from safetensors.torch import load, save_file

from distcifar.errors import CheckpointError
from distcifar.files import follow_umask, fsync_dir

FORMAT = "distcifar-checkpoint/2"
STATE_FIELDS = ("run_state", "world_size", "config", "optimizer", "scheduler")


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


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load optimizer.safetensors and its JSON part into `optimizer`, each state tensor in its parameter's layout."""
    optimizer.load_state_dict(optimizer_from_files(tensors, meta))
    # The files hold NCHW-contiguous tensors: give each state tensor (momentum, Adam moments) its parameter's
    # layout back (channels_last), or the foreach/fused update leaves its fast path for the rest of the run.
    for param, per_param in optimizer.state.items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                per_param[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


# ---------------------------------------------------------------------------------------------
# Writing


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
    save_file(tensors, path)  # straight to disk, without a serialised copy in memory
    follow_umask(path)  # safetensors makes it 0600: a teammate could not load it
    return _sync_and_describe(path)


def _temporary(root: Path, kind: str, final: Path) -> Path:
    """A save's hidden working folder, named by host and pid so that a later run can tell whether its writer lives."""
    return root / f".{kind}-{final.name}-{socket.gethostname()}-{os.getpid()}"


def remove_dead_temporaries(root: Path) -> list[Path]:
    """Remove the working folders of saves whose process is gone (killed mid-save); the ones removed.

    Call it while holding the output folder's lock: then no other run writes here, and a folder of another host
    is a dead run's too. One of this host whose pid still runs is left alone (the pid may have been reused)."""
    here, removed = socket.gethostname(), []
    for folder in sorted(root.glob(".tmp-step_*")) + sorted(root.glob(".old-step_*")):
        host, _, pid = folder.name.split("-", 2)[2].rpartition("-")
        if host == here and pid.isdigit() and psutil.pid_exists(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def write(final: Path, tensor_files: dict[str, dict[str, torch.Tensor]], state: dict, manifest_fields: dict) -> None:
    """Write the checkpoint folder `final`: each safetensors file of `tensor_files`, state.json, then
    manifest.json (with `manifest_fields`), all fsynced in a hidden temporary folder that is renamed into place.
    On any error the temporary folder is removed and `final` (if it existed) is left as it was."""
    root = final.parent
    tmp = _temporary(root, "tmp", final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        files = {name: _write_tensors(tmp / name, tensors) for name, tensors in tensor_files.items()}
        files["state.json"] = _write(tmp / "state.json", json.dumps(state, indent=1).encode())
        manifest = {"format": FORMAT, **manifest_fields, "files": files}
        _write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    if final.exists():  # same step saved again (e.g. a new run in an old folder): swap, then delete
        old = _temporary(root, "old", final)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_dir(root)


# ---------------------------------------------------------------------------------------------
# Reading


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
    """Checkpoint folders under root, the most recently saved first: by the manifest's sequence number, then by
    step. Not by step alone: a new run (--resume never, weights_only, --resume an older checkpoint) in a folder
    that holds later steps of another run saves lower steps, and they are the newest. A folder whose manifest
    cannot be read comes first, so that resuming reports it as damaged rather than passing it over in silence."""
    found = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]

    def newest_first(path: Path) -> tuple[float, int]:
        number = sequence(path)
        return (math.inf if number is None else number, int(path.name[5:]))

    return sorted(found, key=newest_first, reverse=True)


def manifest_field(path: Path, name: str, default=None):
    """One field of a checkpoint's manifest.json, unverified (`default` where it has none); None when the manifest
    cannot be read: what ordering and pruning need, without reading the tensors."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        return manifest.get(name, default)
    except (OSError, ValueError, AttributeError):
        return None


def sequence(path: Path) -> int | None:
    """The save's sequence number in its folder: 0 for a checkpoint made before there were any, None when the
    manifest cannot be read."""
    number = manifest_field(path, "sequence", 0)
    return number if isinstance(number, int) else None


def read_state(path: Path, blobs: dict[str, bytes]) -> dict:
    """state.json of a verified checkpoint, refused when a field this version needs is missing."""
    saved = json.loads(blobs["state.json"])
    missing = [key for key in STATE_FIELDS if key not in saved]
    if missing:
        raise CheckpointError(
            f"{path}: state.json has no field '{missing[0]}' (made by another program or edited by hand?)"
        )
    return saved


def evaluated_weights(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the checkpoint's run config, the weights its run evaluated: the weight average's network when it holds one,
    else the training weights), verified: what evaluate.py loads from a step_* folder."""
    _, blobs = read_verified(Path(path))
    config = read_state(path, blobs)["config"]
    if "ema.safetensors" in blobs:  # AveragedModel's state: its network as "module.<name>", and its counter
        averaged = load(blobs["ema.safetensors"])
        return config, {k.removeprefix("module."): v for k, v in averaged.items() if k != "n_averaged"}
    return config, load(blobs["model.safetensors"])


def load_fitting(
    path, model: torch.nn.Module, tensors: dict[str, torch.Tensor], file: str = "model.safetensors"
) -> None:
    """Load `tensors` (read from `file`) into `model`, or raise CheckpointError naming the first tensor that does
    not fit."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{path}: {file} has no tensor '{name}' (a checkpoint of another model?)")
        if tensors[name].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, the model expects "
                f"{tuple(tensor.shape)} (a checkpoint of another model?)"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: {file} has a tensor '{unexpected[0]}' that the model does not have")
    model.load_state_dict(tensors)
