"""configs/seed.yaml's batched augmentations against the torchvision transforms the coursework named: RandomCrop(32,
padding=4), RandomHorizontalFlip(), RandomVerticalFlip(), RandomRotation(15) and ColorJitter(0.2, 0.2, 0.2). Each
test shows where the on-device version gives torchvision's pixels and where it does not; docs/recipes.md sums it up.
Images are compared in [0, 1] (augment's output with the standardisation undone)."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from distcifar.config import DataConfig
from distcifar.data import augment, augment_params
from support import CIFAR10_MEAN as MEAN
from support import CIFAR10_STD as STD

SEED = DataConfig(augment=["crop", "hflip", "vflip", "rotate", "color_jitter"], rotate_degrees=15, color_jitter=0.2)


def _images(n: int, low: int = 0, high: int = 256) -> torch.Tensor:
    return torch.randint(low, high, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _ours(images: torch.Tensor, augments: list[str], **fixed) -> torch.Tensor:
    """augment() with only `augments` on and the named parameters set (one value per image), in [0, 1]."""
    cfg = DataConfig(augment=augments, crop_padding=4, rotate_degrees=15, color_jitter=0.2)
    params = augment_params(len(images), cfg, torch.Generator().manual_seed(0), "cpu")
    for key, value in fixed.items():
        params[key] = torch.as_tensor(value, dtype=params[key].dtype)
    return augment(images, params, cfg) * STD + MEAN


def test_the_crop_is_random_crop_with_zero_padding_at_every_offset():
    offsets = [(dy, dx) for dy in range(9) for dx in range(9)]  # RandomCrop(32, padding=4) draws each 0..8
    images = _images(len(offsets))
    dy, dx = (torch.tensor(column) for column in zip(*offsets))
    ours = _ours(images, ["crop"], dy=dy, dx=dx)
    for k, (top, left) in enumerate(offsets):
        theirs = TF.crop(TF.pad(images[k], [4], fill=0), top, left, 32, 32).float() / 255
        torch.testing.assert_close(ours[k], theirs, atol=1e-6, rtol=0)
    params = augment_params(4096, SEED, torch.Generator().manual_seed(0), "cpu")
    assert set(params["dx"].tolist()) == set(params["dy"].tolist()) == set(range(9))


def test_the_flips_are_torchvisions_each_with_probability_one_half():
    images = _images(2)
    torch.testing.assert_close(_ours(images, ["hflip"], hflip=[True, False])[0], TF.horizontal_flip(images[0]) / 255)
    torch.testing.assert_close(_ours(images, ["vflip"], vflip=[True, False])[0], TF.vertical_flip(images[0]) / 255)
    params = augment_params(4096, SEED, torch.Generator().manual_seed(0), "cpu")
    for flip in ("hflip", "vflip"):
        assert 0.46 < params[flip].float().mean() < 0.54
    assert 0.21 < (params["hflip"] & params["vflip"]).float().mean() < 0.29  # drawn independently


def test_the_rotation_turns_like_random_rotation_but_samples_bilinearly_where_it_samples_the_nearest_pixel():
    images = _images(1)
    angle = 15.0
    ours = _ours(images, ["rotate"], angle=[math.radians(angle)])[0]
    as_float = images[0].float() / 255
    # the same angle, sign (counter-clockwise) and centre, outside pixels black: torchvision's bilinear rotation
    # without a fill colour (fill=0 would also fade the edge pixels by its mask once more: 168 of 3072 values)
    bilinear = TF.rotate(as_float, angle, interpolation=InterpolationMode.BILINEAR, fill=None)
    torch.testing.assert_close(ours, bilinear, atol=1e-5, rtol=0)
    # RandomRotation's default is the nearest pixel: other values wherever the grid falls between pixels
    nearest = TF.rotate(images[0], angle, interpolation=InterpolationMode.NEAREST, fill=0).float() / 255
    assert (ours - nearest).abs().amax() > 0.1
    # at a quarter turn every sample falls on a pixel centre, and the two agree
    quarter = _ours(images, ["rotate"], angle=[math.pi / 2])[0]
    turned = TF.rotate(images[0], 90.0, interpolation=InterpolationMode.NEAREST, fill=0).float() / 255
    torch.testing.assert_close(quarter, turned, atol=1e-4, rtol=0)
    # the angle: uniform over +-15 degrees, as RandomRotation(15) draws it
    drawn = torch.rad2deg(augment_params(4096, SEED, torch.Generator().manual_seed(0), "cpu")["angle"])
    assert -15 <= drawn.min() < -14.9 and 14.9 < drawn.max() <= 15


def _jitter_in_order(image: torch.Tensor, factors: dict, order: str) -> torch.Tensor:
    """ColorJitter's three adjustments on a float image, in `order` ('b', 'c', 's' letters), as torchvision does."""
    adjust = {"b": TF.adjust_brightness, "c": TF.adjust_contrast, "s": TF.adjust_saturation}
    for letter in order:
        image = adjust[letter](image, factors[letter])
    return image


@pytest.mark.parametrize("b, c, s", [(1.2, 0.8, 1.1), (0.8, 1.2, 0.9), (1.1, 1.1, 0.8)])
def test_colour_jitter_is_color_jitter_where_no_value_leaves_0_to_1(b, c, s):
    images = _images(1, 90, 166)  # mid-range colours: no adjustment reaches 0 or 1
    ours = _ours(images, ["color_jitter"], jitter=[[b, c, s]])[0]
    factors = {"b": b, "c": c, "s": s}
    # the same formulas (torchvision's grey is 0.2989 R, ours 0.299 R: a difference of 1e-4 of a channel); and
    # ColorJitter's random order per image changes nothing here: unclamped, the three adjustments commute
    for order in ("bcs", "scb", "csb", "sbc"):
        torch.testing.assert_close(ours, _jitter_in_order(images[0].float() / 255, factors, order), atol=2e-4, rtol=0)


def test_colour_jitter_clamps_once_at_the_end_where_torchvision_clamps_after_each_adjustment():
    bright = torch.full((1, 3, 32, 32), 230, dtype=torch.uint8)
    bright[..., :16] = 120  # half the image darker: contrast has something to work on
    factors = {"b": 1.2, "c": 0.8, "s": 1.0}
    ours = _ours(bright, ["color_jitter"], jitter=[[1.2, 0.8, 1.0]])[0]
    theirs = _jitter_in_order(bright[0].float() / 255, factors, "bcs")
    # 230 * 1.2 is above 255: torchvision cuts it to 1.0 before the contrast; ours keeps 1.082 until the end
    assert (ours[..., 16:] - theirs[..., 16:]).abs().amin() > 0.01
    # and then the order matters: contrast first keeps the bright half under 1 for the brightness after it
    assert (theirs - _jitter_in_order(bright[0].float() / 255, factors, "cbs")).abs().amax() > 0.01
