"""Checkpoints, in the pytest process: safetensors + JSON only, verified, atomic, and optimizer state restored
in its parameters' memory layout (channels_last). The exact resume after SIGKILL with real processes is in
tests/launch/test_checkpoint_runs.py."""

import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from distcifar.checkpoint import Checkpointer
from distcifar.config import CheckpointConfig, Config, ModelConfig
from distcifar.errors import CheckpointError
from distcifar.evaluate import load_model
from distcifar.model import DistCifarNet
from distcifar.optim import build_optimizer, build_scheduler
from support import TINY_MODEL_CONFIG as TINY

FILES = {"manifest.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"}


def _trained_state(seed=0):
    torch.manual_seed(seed)
    model = DistCifarNet(TINY)
    cfg = Config(model=TINY)
    cfg.optim.name = "adam"
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=4, total_steps=8)
    for _ in range(2):
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        optimizer.step()
        scheduler.step()
    return cfg, model, optimizer, scheduler


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def _checkpointer(accelerator, root, config: Config, keep=5, model=None, optimizer=None, scheduler=None, ema=None):
    cfg = CheckpointConfig(keep=keep)
    return Checkpointer(
        accelerator,
        root,
        cfg,
        config.to_dict(),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
    )


def _save(accelerator, root, step, keep=5, **state):
    cfg, model, optimizer, scheduler = _trained_state(step)
    checkpoints = _checkpointer(accelerator, root, cfg, keep, model, optimizer, scheduler)
    checkpoints.save(step, {"step": step, **state})
    return cfg, model, optimizer, scheduler


def test_layout_format_and_load_without_any_unpickling(accelerator, tmp_path, monkeypatch):
    cfg, model, optimizer, scheduler = _save(accelerator, tmp_path, 7, tracker_run_id="abc123")
    folder = tmp_path / "step_00000007"
    assert {p.name for p in folder.iterdir()} == FILES
    manifest = json.loads((folder / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # A planted pickle that would leave a mark if anything unpickled it.
    marker = tmp_path / "pwned"
    (folder / "evil.pkl").write_bytes(pickle.dumps(_Exploit(str(marker))))

    def forbidden(*args, **kwargs):
        raise AssertionError("the load path must not unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)

    _, fresh_model, fresh_opt, fresh_sched = _trained_state(seed=99)
    ckpt = _checkpointer(accelerator, tmp_path, cfg, model=fresh_model, optimizer=fresh_opt, scheduler=fresh_sched)
    assert ckpt.latest() == folder
    state = ckpt.load(folder)
    assert not marker.exists()
    assert state == {"step": 7, "tracker_run_id": "abc123"}  # the run state handed to save, back as it was
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(a, b)
    saved_state, loaded_state = optimizer.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert saved_state.keys() == loaded_state.keys()
    for index, per_param in saved_state.items():
        assert all(torch.equal(value, loaded_state[index][name]) for name, value in per_param.items())
    assert fresh_sched.state_dict() == scheduler.state_dict()


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "bad_json", "no_manifest"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(accelerator, tmp_path, capsys, damage):
    _save(accelerator, tmp_path, 1)
    _save(accelerator, tmp_path, 2)
    newest = tmp_path / "step_00000002"
    model_file = newest / "model.safetensors"
    if damage == "truncate":
        model_file.write_bytes(model_file.read_bytes()[:-100])
    elif damage == "flip_byte":
        data = bytearray(model_file.read_bytes())
        data[-1] ^= 0xFF
        model_file.write_bytes(bytes(data))
    elif damage == "bad_json":
        (newest / "manifest.json").write_text("{not json")
    else:
        (newest / "manifest.json").unlink()
    assert _checkpointer(accelerator, tmp_path, Config()).latest() == tmp_path / "step_00000001"
    warning = [line for line in capsys.readouterr().out.splitlines() if "step_00000002" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: skipping damaged checkpoint")


def test_keeps_the_last_k_and_leaves_no_temporary_folders(accelerator, tmp_path):
    for step in (1, 2, 3, 4):
        _save(accelerator, tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]


def test_a_new_run_in_a_folder_with_later_steps_keeps_its_own_checkpoints_and_is_the_one_resumed(accelerator, tmp_path):
    for step in (10, 20, 30):  # an earlier run's checkpoints, later steps than the new run will reach
        _save(accelerator, tmp_path, step, keep=3)
    for step in (4, 8):  # the new run (--resume never, or weights_only): each save survives its own pruning
        _save(accelerator, tmp_path, step, keep=3)
        assert (tmp_path / f"step_{step:08d}").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000008", "step_00000030"]
    assert _checkpointer(accelerator, tmp_path, Config()).latest() == tmp_path / "step_00000008"


def test_checkpoint_files_follow_the_umask(accelerator, tmp_path):
    old = os.umask(0o027)
    try:
        _save(accelerator, tmp_path, 1)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "step_00000001").iterdir()}
    assert modes == dict.fromkeys(FILES, 0o640)  # safetensors alone would make its files 0600


def test_a_later_run_removes_what_killed_saves_left_behind_and_nothing_live(accelerator, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host, dead_pid = socket.gethostname(), int(dead.stdout)
    _save(accelerator, tmp_path, 4)
    leftovers = {
        "dead here": tmp_path / f".tmp-step_00000008-{host}-{dead_pid}",
        "swap of a dead save": tmp_path / f".old-step_00000004-{host}-{dead_pid}",
        "another host's, under this run's lock": tmp_path / f".tmp-step_00000008-node-elsewhere-{os.getpid()}",
        "alive here": tmp_path / f".tmp-step_00000012-{host}-{os.getpid()}",
    }
    for folder in leftovers.values():
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    _checkpointer(accelerator, tmp_path, Config()).resume("never")
    assert [name for name, folder in leftovers.items() if folder.exists()] == ["alive here"]
    assert (tmp_path / "step_00000004" / "manifest.json").is_file()
    assert capsys.readouterr().out.count("left behind by a save that was killed") == 3


def test_config_mismatch_names_the_fields(accelerator, tmp_path):
    cfg, *_ = _save(accelerator, tmp_path, 3)
    other = Config(model=ModelConfig(block_channels=[8, 8, 16, 16, 24, 32], classifier_hidden=[32]))
    other.data.train_limit = 100
    _, model, optimizer, scheduler = _trained_state()
    with pytest.raises(CheckpointError, match=r"data\.train_limit .*model\.block_channels|model\.block_channels"):
        _checkpointer(accelerator, tmp_path, other, 5, model, optimizer, scheduler).load(tmp_path / "step_00000003")
    changed_data = Config(model=TINY)
    changed_data.data.train_limit = 100
    ckpt = _checkpointer(accelerator, tmp_path, changed_data, 5, model, optimizer, scheduler)
    with pytest.raises(CheckpointError, match=r"data\.train_limit \(checkpoint 0, now 100\)"):
        ckpt.load(tmp_path / "step_00000003")
    state = ckpt.load(tmp_path / "step_00000003", weights_only=True)
    assert state["step"] == 3


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_state_gets_its_parameters_channels_last_layout_back(accelerator, tmp_path, name):
    """A state tensor laid out unlike its parameter knocks the foreach/fused update off its fast path."""

    def channels_last_state(seed):
        torch.manual_seed(seed)
        cfg = Config(model=TINY)
        cfg.optim.name = name
        model = DistCifarNet(TINY).to(memory_format=torch.channels_last)  # as engine.build_training makes it
        optimizer = accelerator.prepare(build_optimizer(model, cfg.optim))
        scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=4, total_steps=8)
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
            optimizer.step()
            scheduler.step()
        return cfg, model, optimizer, scheduler

    cfg, model, optimizer, scheduler = channels_last_state(seed=0)
    ckpt = _checkpointer(accelerator, tmp_path, cfg, 5, model, optimizer, scheduler)
    folder = ckpt.save(2, {"step": 2})
    _, fresh_model, fresh_opt, fresh_sched = channels_last_state(seed=1)
    _checkpointer(accelerator, tmp_path, cfg, 5, fresh_model, fresh_opt, fresh_sched).load(folder)
    assert any(param.ndim == 4 for param in fresh_model.parameters())
    for saved_param, param in zip(model.parameters(), fresh_model.parameters(), strict=True):
        saved, loaded = optimizer.state[saved_param], fresh_opt.state[param]
        assert loaded.keys() == saved.keys() and loaded
        for key, value in loaded.items():
            assert torch.equal(value, saved[key])
            if value.shape == param.shape:
                assert value.stride() == param.stride(), f"{key} of a {tuple(param.shape)} parameter"


@pytest.mark.parametrize(
    "field, value",
    [("train.seed", 1), ("train.batch_size", 64), ("data.augment", ["crop"]), ("model.dropout", 0.0)],
)
def test_resuming_with_another_seed_batch_data_or_model_is_refused_naming_the_field(
    accelerator, tmp_path, field, value
):
    # A different seed or global batch continues on another data order; the checkpoint would then not be this run's.
    cfg, *_ = _save(accelerator, tmp_path, 3)
    other = _with(cfg, field, value)
    _, model, optimizer, scheduler = _trained_state()
    with pytest.raises(CheckpointError) as refused:
        _checkpointer(accelerator, tmp_path, other, 5, model, optimizer, scheduler).load(tmp_path / "step_00000003")
    old = _get(cfg, field)
    assert f"{field} (checkpoint {old!r}, now {value!r})" in str(refused.value)
    assert str(refused.value).count("(checkpoint ") == 1  # only the field that differs is named


def test_fields_that_may_change_between_attempts_do_not_stop_a_resume(accelerator, tmp_path):
    # More epochs, another learning rate, a moved dataset or cache, another tracker: the same run continues.
    cfg, *_ = _save(accelerator, tmp_path, 3)
    other = cfg
    for field, value in (
        ("train.epochs", 99),
        ("optim.lr", 0.5),
        ("data.path", "/elsewhere/cifar10"),
        ("data.cache_dir", "/elsewhere/cache"),
        ("checkpoint.keep", 9),
        ("tracking.report_to", "none"),
    ):
        other = _with(other, field, value)
    _, model, optimizer, scheduler = _trained_state()
    state = _checkpointer(accelerator, tmp_path, other, 5, model, optimizer, scheduler).load(tmp_path / "step_00000003")
    assert state["step"] == 3


def _get(cfg: Config, field: str):
    section, name = field.split(".")
    return getattr(getattr(cfg, section), name)


def _with(cfg: Config, field: str, value) -> Config:
    """A copy of `cfg` with one `section.name` field set."""
    from distcifar.config import config_from_dict

    tree = cfg.to_dict()
    section, name = field.split(".")
    tree[section][name] = value
    return config_from_dict(tree)


def _averaged(model, updates: int, seed: int) -> AveragedModel:
    """The average train.ema_decay keeps (as engine.build_training makes it), after `updates` moves of the weights
    and the BatchNorm statistics."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(updates):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)
            model(torch.randn(4, 3, 32, 32, generator=generator))  # train mode: the running statistics move
        ema.update_parameters(model)
    return ema


def test_the_weight_average_is_saved_and_restored_bit_for_bit(accelerator, tmp_path):
    cfg, model, optimizer, scheduler = _trained_state()
    ema = _averaged(model, updates=3, seed=0)
    saver = _checkpointer(accelerator, tmp_path, cfg, 5, model, optimizer, scheduler, ema)
    folder = saver.save(4, {"step": 4})
    assert {p.name for p in folder.iterdir()} == FILES | {"ema.safetensors"}
    assert "ema.safetensors" in json.loads((folder / "manifest.json").read_text())["files"]  # verified like the rest
    _, fresh_model, fresh_optimizer, fresh_scheduler = _trained_state(seed=5)
    fresh = _averaged(fresh_model, updates=1, seed=3)
    _checkpointer(accelerator, tmp_path, cfg, 5, fresh_model, fresh_optimizer, fresh_scheduler, fresh).load(folder)
    assert fresh.state_dict().keys() == ema.state_dict().keys()
    assert all(torch.equal(value, fresh.state_dict()[key]) for key, value in ema.state_dict().items())
    assert int(fresh.n_averaged) == 3 and any(key.endswith("running_var") for key in fresh.state_dict())
    # evaluate.py on this checkpoint evaluates the average, as the run did
    evaluated = load_model(folder).state_dict()
    assert all(torch.equal(value, evaluated[key]) for key, value in ema.module.state_dict().items())
    assert not torch.equal(evaluated["classifier.2.weight"], model.state_dict()["classifier.2.weight"])


def test_checkpoints_without_an_average_load_as_before_and_the_average_restarts_from_them(
    accelerator, tmp_path, capsys
):
    cfg, model, *_ = _save(accelerator, tmp_path, 2)  # a run without train.ema_decay: as every earlier checkpoint
    _, fresh_model, fresh_optimizer, fresh_scheduler = _trained_state(seed=5)
    fresh = _averaged(fresh_model, updates=2, seed=3)
    saver = _checkpointer(accelerator, tmp_path, cfg, 5, fresh_model, fresh_optimizer, fresh_scheduler, fresh)
    assert saver.load(tmp_path / "step_00000002")["step"] == 2
    assert all(torch.equal(value, fresh_model.state_dict()[key]) for key, value in model.state_dict().items())
    assert "holds no weight average: train.ema_decay starts it from the resumed weights" in capsys.readouterr().out
    fresh.update_parameters(fresh_model)  # the first update after the resume copies the resumed weights
    assert all(torch.equal(value, fresh.module.state_dict()[key]) for key, value in model.state_dict().items())
    # and a run without the average resumes from a checkpoint that holds one, leaving that file unread
    averaged_run = tmp_path / "averaged"
    cfg, model, optimizer, scheduler = _trained_state(seed=1)
    with_average = _checkpointer(
        accelerator, averaged_run, cfg, 5, model, optimizer, scheduler, _averaged(model, updates=1, seed=0)
    )
    folder = with_average.save(0, {"step": 0})
    _, plain_model, plain_optimizer, plain_scheduler = _trained_state(seed=7)
    _checkpointer(accelerator, averaged_run, cfg, 5, plain_model, plain_optimizer, plain_scheduler).load(folder)
    assert all(torch.equal(value, plain_model.state_dict()[key]) for key, value in model.state_dict().items())


def test_a_checkpoint_made_before_a_config_field_existed_resumes_with_its_default_and_not_with_another(
    accelerator, tmp_path
):
    # data.crop_padding_mode came after the lr sweep of issue 31 started: its checkpoints must resume
    cfg, *_ = _save(accelerator, tmp_path, 3)
    state_file = tmp_path / "step_00000003" / "state.json"
    saved = json.loads(state_file.read_text())
    del saved["config"]["data"]["crop_padding_mode"]
    state_file.write_text(json.dumps(saved))
    manifest_file = tmp_path / "step_00000003" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    data = state_file.read_bytes()  # the manifest verifies every file: sign the edited one again
    manifest["files"]["state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_file.write_text(json.dumps(manifest))
    _, model, optimizer, scheduler = _trained_state()
    state = _checkpointer(accelerator, tmp_path, cfg, 5, model, optimizer, scheduler).load(tmp_path / "step_00000003")
    assert state["step"] == 3
    reflect = _with(cfg, "data.crop_padding_mode", "reflect")
    with pytest.raises(CheckpointError, match=r"data\.crop_padding_mode \(checkpoint 'zeros', now 'reflect'\)"):
        _checkpointer(accelerator, tmp_path, reflect, 5, model, optimizer, scheduler).load(tmp_path / "step_00000003")
