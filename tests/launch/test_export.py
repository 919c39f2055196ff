"""Proves the export: final/'s model card (its metadata, numbers and a usage snippet that runs), --push_to_hub's
checks and its failure path (a real upload to a closed port: the run is kept, one line, exit code 1), and
evaluate.py on a hub model id read from the local Hugging Face cache. The card of a model saved outside a run, in
the pytest process, is in tests/unit/test_model_card.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from distcifar.config import parse_config
from distcifar.model import DistCifarNet
from support import CLASS_NAMES, REPO, free_port, make_images, run, train_args

REPO_ID = "someone/distcifar-tiny"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
# Typed in again so the expectations do not read them from the code under test.
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def _env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT")
    }
    return {**env, **extra}


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, synthetic_data):
    """A short real run with --push_to_hub whose upload meets a closed port: (output folder, its result)."""
    out = tmp_path_factory.mktemp("export") / "run"
    env = _env(
        HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_TOKEN="hf_not_a_real_token", HF_HOME=str(out.parent / "hf")
    )
    result = run(
        [
            sys.executable,
            "distcifar/train.py",
            # with a weight average: the card then says so and gives both accuracies
            *train_args(
                out, synthetic_data, "--push_to_hub", REPO_ID, "--hub.private", "true", "--train.ema_decay", "0.9"
            ),
        ],
        check=False,
        env=env,
    )
    return out, result


def test_a_failed_push_keeps_the_run_says_so_in_one_line_and_exits_1(pushed_run):
    out, result = pushed_run
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[-1]] and result.stderr.rstrip().endswith(errors[-1])
    assert f"could not push {out / 'final'} to the hub repository {REPO_ID} (ConnectError" in errors[0]
    assert f"upload later with `hf upload {REPO_ID} {out / 'final'} --private`" in errors[0]
    assert sorted(p.name for p in (out / "final").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 16 and "test accuracy" in result.stdout  # 256 images / 32 x 2 epochs


def test_the_model_card_describes_the_model_its_training_and_its_results(pushed_run):
    out, trained = pushed_run
    text = (out / "final" / "README.md").read_text()
    card = ModelCard.load(out / "final" / "README.md")
    summary = json.loads((out / "summary.json").read_text())
    assert "More Information Needed" not in text
    assert card.data.library_name == "distcifar" and card.data.pipeline_tag == "image-classification"
    assert card.data.datasets == ["uoft-cs/cifar10"] and card.data.metrics == ["accuracy"]
    assert {"image-classification", "cifar10"} <= set(card.data.tags)
    assert card.data.model_name == REPO_ID
    (result,) = card.data.eval_results
    assert (result.metric_type, result.dataset_split) == ("accuracy", "test")
    assert result.metric_value == pytest.approx(summary["test_accuracy"], abs=1e-4)

    model = DistCifarNet.from_pretrained(out / "final")
    parameters = sum(
        t.numel()
        for name, t in load_file(out / "final" / "model.safetensors").items()
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert f"**Parameters**: {parameters:,}" in text
    assert "| 6 | 3 | 24 | yes | 2x2 |" in text  # the tiny model's last block, from its config
    assert f"mean = {MEAN} and std = [0.247, 0.2435, 0.2616]" in text
    assert (
        f"Test accuracy **{summary['test_accuracy']:.2%}** (loss {summary['test_loss']:.4f}) on 101 test images" in text
    )
    for name, accuracy in zip(CLASS_NAMES, summary["per_class_accuracy"]):
        assert f"| {name} | {accuracy:.2%} |" in text
    assert "- **Optimizer**: Adam, peak learning rate 0.003" in text
    # the recipe of support.train_args and the run's own summary, line by line
    assert "- **Schedule**: 0.5 warm-up epochs, then cosine, in optimizer steps." in text
    assert "- **Batch and length**: global batch 32 (1 accumulation step(s)), 2 epochs, seed 0." in text
    assert (
        f"- **Run**: 16 optimizer steps (2 epochs) on 1 process(es), mixed precision {summary['mixed_precision']}, "
        f"{summary['train_seconds']:.0f} s of training." in text
    )
    assert f"), {summary['mixed_precision']} | global batch 32" in trained.stdout  # the precision it trained in
    assert f"- **Compute**: {summary['train_flops_per_image'] / 1e9:.3g} GFLOP per training image (forward" in text
    assert (
        "- **Weights**: the exponential moving average of the training weights and BatchNorm statistics, updated "
        "after every optimizer step with decay 0.9 (`train.ema_decay`)." in text
    )
    assert (
        f"The training weights themselves, without the average: {summary['test_accuracy_raw']:.2%} "
        f"(loss {summary['test_loss_raw']:.4f})." in text
    )

    recipe = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    (out.parent / "recipe.yaml").write_text(recipe)
    cfg, _ = parse_config(["--config", str(out.parent / "recipe.yaml")], prog="t", description="")
    assert cfg.to_dict() == json.loads((out / "config.json").read_text())


def _hub_cache(hf_home, export) -> None:
    """The Hugging Face cache as a download of REPO_ID leaves it: HF_HOME/hub/models--owner--name/ with
    refs/main naming a snapshot that holds the files."""
    repo = hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}"
    shutil.copytree(export, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)


def test_the_cards_usage_snippet_runs_and_gives_the_models_answer(pushed_run, tmp_path):
    out, _ = pushed_run
    snippet = re.search(r"```python\n(.*?)```", (out / "final" / "README.md").read_text(), re.S).group(1)
    assert f'DistCifarNet.from_pretrained("{REPO_ID}")' in snippet  # the card of a pushed run names the repository
    _hub_cache(tmp_path / "hf", out / "final")
    image = make_images([4], seed=5)[0]  # a class-4 colour image, as in training
    image.save(tmp_path / "image.png")
    result = subprocess.run(
        [sys.executable, "-c", snippet],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = DistCifarNet.from_pretrained(out / "final").eval()
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        p = model((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)).softmax(1)[0]
    assert result.stdout.split()[-2:] == [CLASS_NAMES[int(p.argmax())], f"{float(p.max()):.1%}"]


def test_evaluate_takes_a_hub_model_id_from_the_local_cache(pushed_run, tmp_path, synthetic_data):
    out, _ = pushed_run
    _hub_cache(tmp_path / "hf", out / "final")
    env = _env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    results = []
    for target in (REPO_ID, str(out / "final")):
        report = tmp_path / "eval.json"
        shown = run(
            [
                sys.executable,
                "distcifar/evaluate.py",
                target,
                "--data.path",
                str(synthetic_data),
                "--output",
                str(report),
            ],
            env=env,
        )
        assert "confusion (rows: true, columns: predicted)" in shown.stdout
        results.append(json.loads(report.read_text()))
    from_hub, local = results
    assert from_hub.pop("checkpoint") == REPO_ID and local.pop("checkpoint") == str(out / "final")
    assert from_hub == local and from_hub["eval_samples"] == 101

    missing = run(
        [sys.executable, "distcifar/evaluate.py", "someone/not-cached", "--data.path", str(synthetic_data)],
        env=env,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "error: someone/not-cached: no such local folder, and as a hub model id: the hub cannot be reached "
        "(or HF_HUB_OFFLINE is set) and it is not in the Hugging Face cache"
    ]


@pytest.mark.parametrize(
    "arguments, env, message",
    [
        (
            ["--push_to_hub", "a/b/c"],
            {"HF_TOKEN": "hf_x"},
            "push_to_hub: 'a/b/c' is not a hub repository id such as owner/name",
        ),
        (
            ["--push_to_hub", "me/x"],
            {"HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1"},
            "needs the hub, but HF_HUB_OFFLINE is set",
        ),
        (["--push_to_hub", "me/x"], {}, "needs a Hugging Face token: run `hf auth login` or set HF_TOKEN"),
    ],
)
def test_push_to_hub_that_cannot_work_stops_before_training(tmp_path, arguments, env, message):
    result = run(
        [
            sys.executable,
            "distcifar/train.py",
            "--output_dir",
            str(tmp_path / "run"),
            "--data.path",
            str(tmp_path / "no-data"),
            *arguments,
        ],
        check=False,
        env=_env(HF_HOME=str(tmp_path / "hf"), **env),
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (
        result.stderr
    )
    assert not (tmp_path / "run").exists()
