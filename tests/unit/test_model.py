"""Proves each block equals its formula recomputed by hand, and that the skip, the expert weights and dropout act."""

import torch
import torch.nn.functional as F
from torch import nn

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


def _randomise_batchnorm(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that a test sees every term of the formula."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator, dtype=torch.float64))
            module.running_var.copy_(torch.rand(n, generator=generator, dtype=torch.float64) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator, dtype=torch.float64) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator, dtype=torch.float64))


def _block_by_hand(block, x):
    """pool(relu(skip(x) + sum_i w_i * h_i)), h_i = BN(relu(conv_i(h_{i-1}))), w = softmax over experts of
    fc2(relu(fc1(mean over pixels of x))), all from the block's raw parameters (eval mode)."""
    fc1, fc2 = block.experts.fc1, block.experts.fc2
    pooled = x.mean((2, 3))
    logits = torch.relu(pooled @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias
    weights = logits.exp() / logits.exp().sum(1, keepdim=True)  # each image's weights sum to 1 over its experts
    out = torch.einsum("oc,bchw->bohw", block.skip.weight[:, :, 0, 0], x) + block.skip.bias[None, :, None, None]
    h = x
    for i, (conv, _, bn) in enumerate(block.convs):
        h = torch.relu(F.conv2d(h, conv.weight, conv.bias, padding=1))
        h = (h - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
        h = h * bn.weight[:, None, None] + bn.bias[:, None, None]
        out = out + weights[:, i, None, None, None] * h
    out = torch.relu(out)
    if isinstance(block.pool, nn.AvgPool2d):  # halve: mean of each 2x2 square
        b, c, hh, ww = out.shape
        out = out.reshape(b, c, hh // 2, 2, ww // 2, 2).mean((3, 5))
    return out, weights


def _tiny_double(seed=0):
    torch.manual_seed(seed)
    model = DistCifarNet(ModelConfig(block_channels=[8, 8, 16, 16, 24, 24], classifier_hidden=[32])).double().eval()
    generator = torch.Generator().manual_seed(seed)
    _randomise_batchnorm(model, generator)
    for block in model.blocks:  # distinct expert weights, so that mixing up experts shows
        k = block.experts.fc2.out_features
        block.experts.fc2.bias.data.copy_(torch.linspace(-1.5, 1.5, k, dtype=torch.float64))
    return model, generator


@torch.no_grad()
def test_every_block_computes_the_expert_weighted_formula():
    model, generator = _tiny_double()
    x = model.stem(torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64))
    assert x.shape == (3, 32, 16, 16)  # the stem halves 32x32 to 16x16
    for index, block in enumerate(model.blocks):
        expected, weights = _block_by_hand(block, x)
        got = block(x)
        torch.testing.assert_close(got, expected, msg=f"block {index}")
        torch.testing.assert_close(block.last_expert_weights, weights, msg=f"block {index} weights")
        if weights.shape[1] > 1:
            assert not torch.allclose(weights[:, 0], weights[:, -1])  # the check above could tell experts apart
        x = got
    # The whole network is stem -> blocks -> classifier.
    images = torch.randn(2, 3, 32, 32, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(model(images), model.classifier(model.blocks(model.stem(images))))


@torch.no_grad()
def test_the_expert_weights_choose_which_conv_output_is_added():
    model, generator = _tiny_double(1)
    block = model.blocks[4]  # three convs, no halving
    x = torch.randn(2, block.skip.in_channels, 8, 8, generator=generator, dtype=torch.float64)
    skip = block.skip(x)
    chain = []
    h = x
    for conv in block.convs:
        h = conv(h)
        chain.append(h)
    fc2 = block.experts.fc2
    fc2.weight.zero_()
    outputs = []
    for favourite in range(3):  # a bias of +30 against -30 makes one expert's weight 1 (to 1e-26)
        fc2.bias.copy_(torch.tensor([30.0 if i == favourite else -30.0 for i in range(3)], dtype=torch.float64))
        out = block(x)
        torch.testing.assert_close(block.last_expert_weights, torch.eye(3, dtype=torch.float64)[favourite].expand(2, 3))
        torch.testing.assert_close(out, torch.relu(skip + chain[favourite]))
        outputs.append(out)
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    fc2.bias.zero_()  # equal logits: each of the three outputs weighs a third
    torch.testing.assert_close(block(x), torch.relu(skip + (chain[0] + chain[1] + chain[2]) / 3))


@torch.no_grad()
def test_the_skip_1x1_conv_is_part_of_every_block():
    model, generator = _tiny_double(2)
    for block in model.blocks:  # BatchNorm scale and shift 0: every conv output is 0, only the skip is left
        for _, _, bn in block.convs:
            bn.weight.zero_()
            bn.bias.zero_()
    x = torch.randn(2, 32, 16, 16, generator=generator, dtype=torch.float64)
    for index, block in enumerate(model.blocks):
        skip = torch.einsum("oc,bchw->bohw", block.skip.weight[:, :, 0, 0], x) + block.skip.bias[None, :, None, None]
        expected = torch.relu(skip)
        if model.config.block_halve[index]:
            b, c, h, w = expected.shape
            expected = expected.reshape(b, c, h // 2, 2, w // 2, 2).mean((3, 5))
        torch.testing.assert_close(block(x), expected, msg=f"block {index}")
        assert expected.abs().sum() > 0
        x = torch.randn(expected.shape, generator=generator, dtype=torch.float64)


def test_classifier_dropout_is_active_in_training_and_off_in_eval():
    model = DistCifarNet(ModelConfig(block_channels=[8, 8, 16, 16, 24, 24], classifier_hidden=[64, 32], dropout=0.5))
    dropouts = [m for m in model.classifier if isinstance(m, nn.Dropout)]
    assert [m.p for m in dropouts] == [0.5, 0.5]  # one after each hidden layer
    seen = []
    handle = dropouts[0].register_forward_hook(
        lambda module, inputs, out: seen.append((inputs[0].clone(), out.clone()))
    )
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    inp, out = seen[-1]
    live = inp != 0
    dropped = (out == 0) & live
    assert 0.4 < dropped.sum() / live.sum() < 0.6  # about half of the units are dropped ...
    torch.testing.assert_close(out[live & ~dropped], inp[live & ~dropped] * 2)  # ... and the rest scaled by 1 / (1 - p)
    assert not torch.equal(model(x), first)  # a new mask each pass
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
        inp, out = seen[-1]
        assert torch.equal(out, inp)  # eval: dropout is the identity
        assert torch.equal(model(x), evaluated)
    handle.remove()
