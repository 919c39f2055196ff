"""The configuration, in the pytest process: defaults, recipes and overrides, values as a user means them, and
every mistake as one clear error. --help and exit code 2 from each entry point, which start the scripts, are in
tests/launch/test_config_cli.py."""

import pytest
import yaml

from distcifar.config import Config, config_from_dict, flatten, parse_config
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


@pytest.mark.parametrize("recipe", ["cpu", "seed", "default", "smoke"])
def test_every_value_a_shipped_recipe_writes_is_the_value_it_runs_with(recipe):
    # the YAML read on its own (PyYAML; these files hold nothing that YAML 1.1 and 1.2 read differently)
    written = flatten(yaml.safe_load((REPO / "configs" / f"{recipe}.yaml").read_text()))
    cfg = flatten(load_config(["--config", str(REPO / "configs" / f"{recipe}.yaml")]).to_dict())
    assert written and {key: cfg.get(key, "(no such field)") for key in written} == written


def test_recipes_are_what_the_readme_says():
    # README's recipe table and main command, typed in again
    cpu = load_config(["--config", str(REPO / "configs" / "cpu.yaml")])
    assert (cpu.model.block_convs, cpu.train.epochs) == ([1, 2, 2, 2, 3, 3], 8)  # the seed's conv layers per block
    assert (cpu.data.train_limit, cpu.data.eval_limit) == (0, 0)  # all 50,000 training and 10,000 test images
    assert cpu.model.block_channels != Config().model.block_channels  # width-scaled, not the full-size network
    default = load_config(["--config", str(REPO / "configs" / "default.yaml")])
    assert default.model.dropout == 0.0 and Config().model.dropout == 0.5  # the seed's head, without its dropout
    optim = default.optim
    assert (optim.name, optim.nesterov, optim.lr, optim.schedule, optim.warmup_epochs) == (
        "sgd",
        True,
        0.4,
        "cosine",
        2,
    )
    assert (optim.label_smoothing, optim.decay_norm_and_bias) == (0.1, False)
    assert (default.data.augment, default.train.mixed_precision, default.train.channels_last) == (
        ["crop", "hflip", "cutout"],
        "auto",
        True,
    )
    assert (default.data.crop_padding_mode, default.data.cutout_size) == ("reflect", 12)
    assert (default.train.epochs, default.train.batch_size) == (30, 512)
    smoke = load_config(["--config", str(REPO / "configs" / "smoke.yaml")])
    assert (smoke.data.train_limit, smoke.data.eval_limit, smoke.train.epochs) == (512, 500, 2)


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
        (["--data.hflip_mode", "alternate", "--data.augment", "[crop]"], "data.hflip_mode alternate needs hflip"),
        (["--train.epochs"], "train.epochs"),
        (["stray"], "stray"),
        (["--train.profile_steps", "5:3"], "train.profile_steps must be A:B with 1 <= A <= B"),
        (["--train.profile_steps", "0:2"], "train.profile_steps must be A:B"),
        (["--train.profile_steps", "4"], "train.profile_steps must be A:B"),
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
        "  profile_steps: 3:5\n  epochs: 12\n"
    )
    cfg = load_config(["--config", str(recipe), "--tracking.run_name", "2024", "--tracking.group", "no"])
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.001, 0.0005)
    assert cfg.train.mixed_precision == "no" and cfg.train.channels_last is False
    assert cfg.train.profile_steps == "3:5" and cfg.train.profile_window == (3, 5)  # YAML 1.1: the number 185
    assert cfg.train.epochs == 12
    assert cfg.tracking.run_name == "2024" and cfg.tracking.group == "no"
    assert load_config(["--optim.lr", "1e-3", "--train.mixed_precision", "no"]).optim.lr == 0.001
    assert load_config(["--model.block_halve", "[true,false,true,false,true,false]"]).model.block_halve[:2] == [
        True,
        False,
    ]


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_output_folder_that_cannot_be_made_is_one_line_and_exit_2(tmp_path, capsys, fresh_accelerate_state, where):
    from distcifar import train

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    output_dir = blocker if where == "a file" else blocker / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(["--output_dir", str(output_dir), "--tracking.report_to", "none"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot use --output_dir {output_dir}: ") and "\n" not in err, err


def test_printed_tables_align_each_column_to_its_widest_cell():
    from distcifar.cli import columns

    lines = columns([["name", "value", "note"], ["a", "1.5", "x"], ["longer", "10.25", ""]], "<><", indent=" ")
    assert lines == [" name    value  note", " a         1.5  x", " longer  10.25"]
