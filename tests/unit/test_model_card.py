"""The model card of a model saved outside a training run (save_pretrained in the pytest process). The cards of
real runs, and what they say, are in tests/launch/test_export.py."""

from huggingface_hub import ModelCard

from distcifar.model import DistCifarNet
from support import TINY_MODEL_CONFIG


def test_save_pretrained_outside_a_run_writes_a_real_card_too(tmp_path):
    DistCifarNet(TINY_MODEL_CONFIG).save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "README.md").read_text()
    assert "More Information Needed" not in text and "## Architecture" in text
    assert "its training run is not recorded here" in text
    assert ModelCard.load(tmp_path / "m" / "README.md").data.library_name == "distcifar"
