"""The configuration's command line through the scripts themselves: --help lists every field, and a usage
error is one line and exit code 2 from every entry point, before any heavy work. The in-process configuration
tests are in tests/unit/test_config.py."""

import sys

import pytest

from distcifar.config import Config, flatten
from support import run


def test_train_py_exits_2_with_one_line_before_heavy_work():
    result = run([sys.executable, "distcifar/train.py", "--optim.lrr", "0.1"], timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown option --optim.lrr (did you mean --optim.lr?); see --help"
    ]


@pytest.mark.parametrize("script", ["distcifar/train.py", "distcifar/evaluate.py", "distcifar/benchmark.py"])
def test_help_lists_every_field_with_its_comment_and_default(script):
    result = run([sys.executable, script, "--help"], timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for key in flatten(Config().to_dict()):
        assert f"--{key}" in text, key
    assert "Peak learning rate. (type: float, default: 0.2)" in text
    assert "auto: the newest good checkpoint in OUTPUT_DIR/checkpoints; never; or a checkpoint folder." in text


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "distcifar.train"],
        ["-m", "distcifar.evaluate", "x"],
        ["-m", "distcifar.benchmark"],
        ["-m", "distcifar.plot", "x", "y"],
    ],
)
def test_every_entry_point_turns_a_usage_error_into_exit_2(command):
    result = run([sys.executable, *command, "--train.epochs", "0"], timeout=120, check=False)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")
