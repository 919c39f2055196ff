"""The configuration, in the pytest process: defaults, recipes and overrides, values as a user means them, and
every mistake as one clear error. --help and exit code 2 from each entry point, which start the scripts, are in
tests/launch/test_config_cli.py."""

import pytest

from distcifar.config import Config, config_from_dict, parse_config
from distcifar.errors import ConfigError
from support import REPO


def load_config(argv):
    return parse_config(argv, prog="test", description="")[0]


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
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule, cfg.optim.step_epochs, cfg.optim.step_gamma) == (
        "adam",
        0.002,
        "step",
        10,
        0.5,
    )
    assert (cfg.train.epochs, cfg.train.batch_size) == (80, 1024)
    assert set(cfg.data.augment) >= {"crop", "hflip", "vflip", "rotate", "color_jitter"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--optim.lrr", "0.1"], "unknown option --optim.lrr (did you mean --optim.lr?)"),
        (["--trian.epochs", "3"], "did you mean --train.epochs?"),
        (["--train.epochs", "three"], "key \"train.epochs\": Expected a <class 'int'>. Got value: three"),
        (["--train.channels_last", "maybe"], 'key "train.channels_last"'),
        (["--optim.lr", "-0.1"], "optim.lr must be > 0"),
        (["--train.batch_size", "0"], "train.batch_size must be > 0"),
        (["--optim.schedule", "cosin"], 'key "optim.schedule": Expected a typing.Literal'),
        (["--data.augment", "[crop,blur]"], 'key "data.augment"'),
        (["--train.batch_size", "100", "--train.grad_accum_steps", "3"], "divisible"),
        (["--config", "nope.yaml"], "nope.yaml"),
        (["--model.dropout", "1.0"], "model.dropout must be in"),
        (["--train.ema_decay", "1.0"], "train.ema_decay must be in [0, 1) (0 = off), got 1.0"),
        (["--train.stop_at_accuracy", "93"], "train.stop_at_accuracy must be in [0, 1] (0 = off), got 93"),
        (["--train.eval_every_epochs", "0"], "train.eval_every_epochs must be > 0"),
        (["--data.cutout_size", "0"], "data.cutout_size must be in 1..32"),
        (["--train.epochs"], "train.epochs"),
        (["stray"], "stray"),
    ],
)
def test_bad_config_is_one_clear_error(argv, message):
    with pytest.raises(ConfigError) as raised:
        load_config(argv)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_values_mean_what_a_user_means(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "optim:\n  lr: 1e-3\n  weight_decay: 5e-4\ntrain:\n  mixed_precision: no\n  channels_last: false\n"
    )
    cfg = load_config(["--config", str(recipe), "--tracking.run_name", "2024", "--tracking.group", "no"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.001, 0.0005)
    assert cfg.train.mixed_precision == "no" and cfg.train.channels_last is False
    assert cfg.tracking.run_name == "2024" and cfg.tracking.group == "no"
    assert load_config(["--optim.lr", "1e-3", "--train.mixed_precision", "no"]).optim.lr == 0.001
    assert load_config(["--model.block_halve", "[true,false,true,false,true,false]"]).model.block_halve[:2] == [
        True,
        False,
    ]
