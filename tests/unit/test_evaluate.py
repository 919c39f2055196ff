"""evaluate.py's --recompute_bn in the pytest process: the statistics it sets against ones computed by hand."""

import torch

from distcifar.data import Split, normalize
from distcifar.evaluate import recompute_bn_statistics
from distcifar.model import DistCifarNet
from support import TINY_MODEL_CONFIG


def test_recomputed_bn_statistics_are_the_training_images_own():
    # The first BatchNorm's input does not depend on any BatchNorm statistics, so its exact mean over all training
    # images is known beforehand: equal batches of 500 make the average of the batch means that mean.
    generator = torch.Generator().manual_seed(0)
    train = Split(torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8, generator=generator), torch.zeros(1000))
    model = DistCifarNet(TINY_MODEL_CONFIG).eval()
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    handle = first.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(normalize(train.images))
    handle.remove()
    expected_mean = seen[0].mean(dim=(0, 2, 3))
    assert not torch.allclose(first.running_mean, expected_mean, atol=1e-3)  # the initial zeros are not it

    recompute_bn_statistics(model, train, torch.device("cpu"))
    torch.testing.assert_close(first.running_mean, expected_mean, rtol=1e-4, atol=1e-5)
    batch_variances = torch.stack([batch.var(dim=(0, 2, 3)) for batch in seen[0].split(500)])
    torch.testing.assert_close(first.running_var, batch_variances.mean(0), rtol=1e-4, atol=1e-5)
    assert first.momentum == 0.1 and not model.training  # left as found
