"""The model card of a model saved outside a training run (save_pretrained in the pytest process). The cards of
real runs, and what they say, are in tests/launch/test_export.py."""

import os

from huggingface_hub import ModelCard

from distcifar.config import Config
from distcifar.export import write_final
from distcifar.model import DistCifarNet
from support import TINY_MODEL_CONFIG


def test_save_pretrained_outside_a_run_writes_a_real_card_too(tmp_path):
    DistCifarNet(TINY_MODEL_CONFIG).save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "README.md").read_text()
    assert "More Information Needed" not in text and "## Architecture" in text
    assert "its training run is not recorded here" in text
    assert ModelCard.load(tmp_path / "m" / "README.md").data.library_name == "distcifar"


def test_the_export_follows_the_umask_like_its_json_and_card(tmp_path):
    old = os.umask(0o027)
    try:
        write_final(DistCifarNet(TINY_MODEL_CONFIG), tmp_path / "final", Config(model=TINY_MODEL_CONFIG), None)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "final").iterdir()}
    assert modes == {"config.json": 0o640, "README.md": 0o640, "model.safetensors": 0o640}  # not 0600
