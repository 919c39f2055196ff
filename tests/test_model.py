import torch

from distcifar.config import ModelConfig
from distcifar.model import DistCifarNet


def test_seed_network_has_the_coursework_parameter_count():
    assert sum(p.numel() for p in DistCifarNet().parameters()) == 11_658_297


def test_output_shape_and_expert_weights_after_one_forward():
    model = DistCifarNet().eval()
    logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 10)
    weights = model.expert_weights()
    assert [w.shape for w in weights] == [(4, k) for k in (1, 2, 2, 2, 3, 3)]
    for w in weights:
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(1), torch.ones(4))
    # Per-image weights: different inputs give different mixtures.
    assert not torch.allclose(weights[-1][0], weights[-1][1])


def test_architecture_comes_from_the_config():
    config = ModelConfig(block_channels=[8, 8, 16, 16, 24, 24], classifier_hidden=[32], num_classes=5, dropout=0.1)
    model = DistCifarNet(config)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    assert model.classifier[4].p == 0.1


def test_export_loads_back_in_two_lines(tmp_path):
    model = DistCifarNet(ModelConfig(block_channels=[8, 8, 16, 16, 24, 24], classifier_hidden=[32])).eval()
    model.save_pretrained(tmp_path, config=model.config)
    assert {"model.safetensors", "config.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = DistCifarNet.from_pretrained(tmp_path).eval()
    x = torch.randn(3, 3, 32, 32)
    assert loaded.config == model.config
    assert torch.equal(loaded(x), model(x))
