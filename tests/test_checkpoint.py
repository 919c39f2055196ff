"""Checkpoints: safetensors + JSON only, verified, atomic, an exact resume after SIGKILL, and optimizer state
restored in its parameters' memory layout (channels_last)."""

import hashlib
import json
import os
import pickle
import signal
import subprocess
import time

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from distcifar.checkpoint import Checkpointer, CheckpointError
from distcifar.config import CheckpointConfig, Config, ModelConfig
from distcifar.engine import RunState
from distcifar.model import DistCifarNet
from distcifar.optim import build_optimizer, build_scheduler
from support import REPO, kill_tree, launch_command, read_metrics, run, train_args
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


def _checkpointer(accelerator, root, config: Config, keep=5):
    return Checkpointer(accelerator, root, CheckpointConfig(keep=keep), config.to_dict())


def _save(accelerator, root, step, keep=5, **state):
    cfg, model, optimizer, scheduler = _trained_state(step)
    _checkpointer(accelerator, root, cfg, keep).save(
        RunState(step=step, **state), model=model, optimizer=optimizer, scheduler=scheduler
    )
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
    ckpt = _checkpointer(accelerator, tmp_path, cfg)
    assert ckpt.latest() == folder
    state = ckpt.load(folder, model=fresh_model, optimizer=fresh_opt, scheduler=fresh_sched)
    assert not marker.exists()
    assert state == RunState(step=7, tracker_run_id="abc123")
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


def test_config_mismatch_names_the_fields(accelerator, tmp_path):
    cfg, *_ = _save(accelerator, tmp_path, 3)
    other = Config(model=ModelConfig(block_channels=[8, 8, 16, 16, 24, 32], classifier_hidden=[32]))
    other.data.train_limit = 100
    _, model, optimizer, scheduler = _trained_state()
    with pytest.raises(CheckpointError, match=r"data\.train_limit .*model\.block_channels|model\.block_channels"):
        _checkpointer(accelerator, tmp_path, other).load(
            tmp_path / "step_00000003", model=model, optimizer=optimizer, scheduler=scheduler
        )
    changed_data = Config(model=TINY)
    changed_data.data.train_limit = 100
    ckpt = _checkpointer(accelerator, tmp_path, changed_data)
    with pytest.raises(CheckpointError, match=r"data\.train_limit \(checkpoint 0, now 100\)"):
        ckpt.load(tmp_path / "step_00000003", model=model, optimizer=optimizer, scheduler=scheduler)
    state = ckpt.load(tmp_path / "step_00000003", model=model)  # weights only
    assert state.step == 3


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_state_gets_its_parameters_channels_last_layout_back(accelerator, tmp_path, name):
    """A state tensor laid out unlike its parameter knocks the foreach/fused update off its fast path."""

    def channels_last_state(seed):
        torch.manual_seed(seed)
        cfg = Config(model=TINY)
        cfg.optim.name = name
        model = DistCifarNet(TINY).to(memory_format=torch.channels_last)  # as engine.build makes it
        optimizer = accelerator.prepare(build_optimizer(model, cfg.optim))
        scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch=4, total_steps=8)
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)).sum().backward()
            optimizer.step()
            scheduler.step()
        return cfg, model, optimizer, scheduler

    cfg, model, optimizer, scheduler = channels_last_state(seed=0)
    ckpt = _checkpointer(accelerator, tmp_path, cfg)
    folder = ckpt.save(RunState(step=2), model=model, optimizer=optimizer, scheduler=scheduler)
    _, fresh_model, fresh_opt, fresh_sched = channels_last_state(seed=1)
    ckpt.load(folder, model=fresh_model, optimizer=fresh_opt, scheduler=fresh_sched)
    assert any(param.ndim == 4 for param in fresh_model.parameters())
    for saved_param, param in zip(model.parameters(), fresh_model.parameters(), strict=True):
        saved, loaded = optimizer.state[saved_param], fresh_opt.state[param]
        assert loaded.keys() == saved.keys() and loaded
        for key, value in loaded.items():
            assert torch.equal(value, saved[key])
            if value.shape == param.shape:
                assert value.stride() == param.stride(), f"{key} of a {tuple(param.shape)} parameter"


# ---------------------------------------------------------------------------------------------
# Exact resume with real processes


def _start(command):
    return subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _kill_after_checkpoint(command, folder, timeout=240):
    """Run until `folder` (a checkpoint) appears, then SIGKILL the whole process group."""
    process = _start(command)
    deadline = time.monotonic() + timeout
    while not (folder / "manifest.json").exists():
        assert process.poll() is None, f"run ended before {folder.name}:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)
    kill_tree(process.pid, signal.SIGKILL)
    process.wait()
    assert not (folder.parent.parent / "summary.json").exists()


def _weights(out):
    return load_file(out / "final" / "model.safetensors")


def _assert_same_run(straight, resumed):
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    evals = lambda out: [
        (m["step"], m["eval/accuracy"], m["eval/loss"]) for m in read_metrics(out) if "eval/accuracy" in m
    ]  # noqa: E731
    assert evals(resumed)[-1] == evals(straight)[-1]
    summary = lambda out: json.loads((out / "summary.json").read_text())  # noqa: E731
    assert summary(resumed)["test_accuracy"] == summary(straight)["test_accuracy"]
    assert summary(resumed)["global_step"] == summary(straight)["global_step"]


@pytest.mark.parametrize(
    "processes, extra",
    [
        (1, []),
        (1, ["--train.grad_accum_steps", "2"]),
        (2, ["--train.grad_accum_steps", "2"]),
    ],
    ids=["1proc", "1proc-accum2", "2proc-accum2"],
)
def test_killed_run_resumes_bit_identical(tmp_path, synthetic_data, processes, extra):
    # 8 steps per epoch, 2 epochs; the kill lands right after the mid-epoch checkpoint at step 5.
    args = ["--checkpoint.every_steps", "5", "--model.dropout", "0.5", *extra]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(launch_command(processes) + train_args(straight, synthetic_data, *args))
    _kill_after_checkpoint(
        launch_command(processes) + train_args(resumed, synthetic_data, *args),
        resumed / "checkpoints" / "step_00000005",
    )
    result = run(launch_command(processes) + train_args(resumed, synthetic_data, *args))
    # from the mid-epoch checkpoint (step 5 of 8 in epoch 1), not an epoch end and not from scratch
    assert f"resumed from {resumed / 'checkpoints' / 'step_00000005'} at step 5" in result.stdout
    assert [m["step"] for m in read_metrics(resumed) if "train/loss" in m][-11:] == list(range(6, 17))
    _assert_same_run(straight, resumed)
    steps = [m["step"] for m in read_metrics(resumed) if "train/loss" in m]
    assert steps[-1] == 16


def test_resume_on_a_different_number_of_processes(tmp_path, synthetic_data):
    out = tmp_path / "run"
    args = ["--checkpoint.every_steps", "5"]
    _kill_after_checkpoint(
        launch_command(2) + train_args(out, synthetic_data, *args), out / "checkpoints" / "step_00000005"
    )
    result = run(launch_command(1) + train_args(out, synthetic_data, *args))
    assert "resumed from" in result.stdout and "1 process(es)" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 16 and summary["num_processes"] == 1
    train_steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert train_steps[-11:] == list(range(6, 17))  # continued from the sample position of step 5


def test_sigterm_saves_a_checkpoint_then_resume_finishes(tmp_path, synthetic_data):
    out = tmp_path / "run"
    command = launch_command(2) + train_args(out, synthetic_data, "--train.epochs", "3")
    process = _start(command)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or len(read_metrics(out)) < 3:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # what scancel and Ctrl-C do: every process gets it
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "stopped by signal" in output
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert saved, output[-2000:]
    result = run(launch_command(2) + train_args(out, synthetic_data, "--train.epochs", "3"))
    assert f"resumed from {saved[-1]}" in result.stdout
    assert json.loads((out / "summary.json").read_text())["global_step"] == 24


def test_export_and_evaluate_script(tmp_path, synthetic_data):
    out = tmp_path / "run"
    # a trained model (about all synthetic classes right), so that the comparison is not one of one-class answers
    run(
        launch_command(1, launcher="python")
        + train_args(out, synthetic_data, "--train.batch_size", "16", "--train.epochs", "3", "--model.dropout", "0.0")
    )
    summary = json.loads((out / "summary.json").read_text())
    trained = json.loads((out / "confusion.json").read_text())["confusion"]  # train.py's own last evaluation
    assert summary["test_accuracy"] > 0.5
    model = DistCifarNet.from_pretrained(out / "final")
    assert model.config == ModelConfig(**json.loads((out / "final" / "config.json").read_text()))
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pkl", ".pt", ".pth")]
    for target in (out / "final", sorted((out / "checkpoints").glob("step_*"))[-1]):
        report = tmp_path / "eval.json"
        result = run(
            launch_command(2, script="distcifar/evaluate.py")
            + [str(target), "--data.path", str(synthetic_data), "--output", str(report)]
        )
        evaluation = json.loads(report.read_text())
        assert evaluation["eval_samples"] == 101 and evaluation["num_processes"] == 2
        assert evaluation["confusion"] == trained
        assert evaluation["eval_accuracy"] == pytest.approx(summary["test_accuracy"])
        assert evaluation["eval_loss"] == pytest.approx(summary["test_loss"], rel=1e-3)  # bf16 on some CPUs
        assert "confusion (rows: true, columns: predicted)" in result.stdout
