"""The model card in the pytest process: the card of a model saved outside a training run, and the lines a run's
config and summary give it (typed-in values). The cards of real runs are in tests/launch/test_export.py."""

import os

from huggingface_hub import ModelCard

from distcifar.config import Config
from distcifar.export import model_card, write_final
from distcifar.model import DistCifarNet
from support import TINY_MODEL_CONFIG


def test_save_pretrained_outside_a_run_writes_a_real_card_too(tmp_path):
    DistCifarNet(TINY_MODEL_CONFIG).save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "README.md").read_text()
    assert "More Information Needed" not in text and "## Architecture" in text
    assert "its training run is not recorded here" in text
    assert ModelCard.load(tmp_path / "m" / "README.md").data.library_name == "distcifar"


def test_the_card_of_a_run_states_its_schedule_batch_precision_and_training_time():
    # Values unlike any default, typed in by hand; wall time (evaluations and saves included) far from training time.
    cfg = Config(model=TINY_MODEL_CONFIG, output_dir="runs/card")
    cfg.optim.schedule, cfg.optim.warmup_epochs, cfg.optim.step_epochs, cfg.optim.step_gamma = "step", 1.5, 5.0, 0.3
    cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.train.seed = 512, 4, 7
    cfg.train.epochs, cfg.train.max_steps = 3, 40
    cfg.data.crop_padding_mode, cfg.data.hflip_mode = "reflect", "alternate"
    summary = {
        "test_accuracy": 0.5,
        "test_loss": 1.25,
        "eval_samples": 100,
        "eval_split": "test",
        "per_class_accuracy": [0.5] * 10,
        "global_step": 40,
        "epochs": 2.5,
        "num_processes": 4,
        "mixed_precision": "bf16",
        "train_seconds": 123.4,
        "wall_seconds": 456.7,
        "train_flops_per_image": 1.584e9,
    }
    text = str(model_card(DistCifarNet(TINY_MODEL_CONFIG), cfg=cfg, summary=summary))
    assert "augmentation on the device: crop, hflip (crop padding 4, reflect); hflip alternates by epoch." in text
    assert "- **Schedule**: 1.5 warm-up epochs, then step (x0.3 every 5.0 epochs), in optimizer steps." in text
    assert (
        "- **Batch and length**: global batch 512 (4 accumulation step(s)), 3 epochs, at most 40 steps, seed 7." in text
    )
    run_line = "- **Run**: 40 optimizer steps (2.5 epochs) on 4 process(es), mixed precision bf16, 123 s of training."
    assert run_line in text
    assert "457" not in text  # the wall time is not training time
    assert "- **Compute**: 1.58 GFLOP per training image (forward + backward" in text


def test_the_export_follows_the_umask_like_its_json_and_card(tmp_path):
    old = os.umask(0o027)
    try:
        write_final(DistCifarNet(TINY_MODEL_CONFIG), tmp_path / "final", Config(model=TINY_MODEL_CONFIG), None)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "final").iterdir()}
    assert modes == {"config.json": 0o640, "README.md": 0o640, "model.safetensors": 0o640}  # not 0600
