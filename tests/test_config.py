import subprocess
import sys

import pytest

from conftest import REPO
from distcifar.config import Config, ConfigError, config_from_dict, load_config


def test_defaults_yaml_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 7\n  batch_size: 256\noptim:\n  lr: 0.1\n")
    cfg = load_config(["--config", str(recipe), "--train.epochs", "3", "--optim.lr=0.5", "--data.augment", "[crop]"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr, cfg.data.augment) == (3, 256, 0.5, ["crop"])
    assert cfg.model.block_channels == Config().model.block_channels
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("recipe", ["seed", "default", "smoke"])
def test_shipped_recipes_load(recipe):
    cfg = load_config(["--config", str(REPO / "configs" / f"{recipe}.yaml")])
    assert cfg.train.epochs > 0


def test_seed_recipe_is_the_coursework():
    cfg = load_config(["--config", str(REPO / "configs" / "seed.yaml")])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule, cfg.optim.step_epochs, cfg.optim.step_gamma) == ("adam", 0.002, "step", 10, 0.5)
    assert (cfg.train.epochs, cfg.train.batch_size) == (80, 1024)
    assert set(cfg.data.augment) >= {"crop", "hflip", "vflip", "rotate", "color_jitter"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optim.lrr", "0.1"], "did you mean 'lr'"),
        (["--trian.epochs", "3"], "did you mean 'train'"),
        (["--train.epochs", "three"], "train.epochs: expected an integer"),
        (["--train.channels_last", "maybe"], "expected true or false"),
        (["--optim.lr", "-0.1"], "optim.lr must be > 0"),
        (["--train.batch_size", "0"], "train.batch_size must be > 0"),
        (["--optim.schedule", "cosin"], "did you mean 'cosine'"),
        (["--data.augment", "[crop,blur]"], "unknown augmentation 'blur'"),
        (["--train.batch_size", "100", "--train.grad_accum_steps", "3"], "divisible"),
        (["--config", "nope.yaml"], "does not exist"),
        (["--model", "3"], "is a section"),
        (["--train.epochs"], "needs a value"),
        (["stray"], "unexpected argument"),
    ],
)
def test_bad_config_is_one_clear_error(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(argv)


def test_train_py_exits_2_with_one_line_before_heavy_work():
    result = subprocess.run([sys.executable, "distcifar/train.py", "--optim.lrr", "0.1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown config key 'optim.lrr' in optim (did you mean 'lr'?)"]
