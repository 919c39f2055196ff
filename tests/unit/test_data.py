"""Proves loading, per-image augmentation (pixel for pixel against hand-built expectations) and epoch batching, in
the pytest process. The hub seen through a proxy, one fresh process per case, is in tests/launch/test_data_hub.py."""

import math
import time

import numpy as np
import pytest
import torch

import distcifar.data as data
from distcifar.config import DataConfig
from distcifar.data import TrainBatches, augment, augment_params, load_splits, normalize
from distcifar.errors import DataError
from support import CIFAR10_MEAN as MEAN
from support import CIFAR10_STD as STD
from support import CLASS_NAMES, make_images, write_parquet_dataset


def _standardise(x01: torch.Tensor) -> torch.Tensor:
    """Floats in [0, 1] -> (x - mean) / std, by hand."""
    return (x01 - MEAN) / STD


def test_parquet_in_the_hub_schema_loads_through_the_real_path(synthetic_data, tmp_path):
    train, test, name = load_splits(DataConfig(path=str(synthetic_data), cache_dir=str(tmp_path)))
    assert name == "test" and len(train) == 256 and len(test) == 101
    assert train.images.dtype == torch.uint8 and train.images.shape == (256, 3, 32, 32)
    assert train.labels.dtype == torch.int64 and 0 <= train.labels.min() <= train.labels.max() <= 9
    labels = np.random.default_rng(1).integers(0, 10, 256)
    expected = np.array(make_images([int(x) for x in labels[:1]], seed=1)[0])  # PNG-encoded: lossless
    assert torch.equal(train.images[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_decoded_split_is_cached_by_its_data_files(synthetic_data, tmp_path, monkeypatch):
    cfg = DataConfig(path=str(synthetic_data), cache_dir=str(tmp_path))
    first, _, _ = load_splits(cfg)
    assert sorted(p.name.split("-")[0] for p in tmp_path.glob("*.safetensors")) == ["test", "train"]
    monkeypatch.setattr(data, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    second, _, _ = load_splits(cfg)
    assert torch.equal(first.images, second.images)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_decoded_cache_is_decoded_again(synthetic_data, tmp_path, capsys, damage):
    cfg = DataConfig(path=str(synthetic_data), cache_dir=str(tmp_path))
    first, _, _ = load_splits(cfg)
    cache = next(tmp_path.glob("train-*.safetensors"))
    content = cache.read_bytes()
    cache.write_bytes({"truncated": content[: len(content) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    second, _, _ = load_splits(cfg)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert f"decoding train again: its cache {cache} is damaged" in capsys.readouterr().out
    assert cache.read_bytes() == content  # written whole again


def test_the_decoded_cache_follows_the_data_when_it_changes_in_place(tmp_path):
    """A save_to_disk folder rewritten with other labels (same path, same file sizes) is decoded again."""
    import datasets

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    images, labels = make_images(list(range(10)) * 2), list(range(10)) * 2
    folder, cfg = tmp_path / "saved", DataConfig(path=str(tmp_path / "saved"), cache_dir=str(tmp_path / "c"))
    loaded = []
    for shift in (0, 3):
        rows = {"img": images, "label": [(y + shift) % 10 for y in labels]}
        datasets.DatasetDict(
            {split: datasets.Dataset.from_dict(rows, features=features) for split in ("train", "test")}
        ).save_to_disk(str(folder))
        loaded.append(load_splits(cfg)[0])
    assert loaded[0].labels.tolist() == labels
    assert loaded[1].labels.tolist() == [(y + 3) % 10 for y in labels]
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 4


def test_the_decoded_cache_lives_where_the_conventions_say(synthetic_data, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTCIFAR_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_splits(DataConfig(path=str(synthetic_data)))
    assert len(list((tmp_path / "xdg" / "distcifar").glob("*.safetensors"))) == 2
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_root(DataConfig()) == tmp_path / "home" / ".cache" / "distcifar"
    monkeypatch.setenv("DISTCIFAR_CACHE", str(tmp_path / "mine"))
    assert data.cache_root(DataConfig()) == tmp_path / "mine"
    assert data.cache_root(DataConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"


def test_save_to_disk_folder_limits_and_validation_split(synthetic_data, tmp_path):
    import datasets

    datasets.load_dataset(str(synthetic_data)).save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(path=str(tmp_path / "saved"), cache_dir=str(tmp_path / "c"), train_limit=100, eval_limit=10)
    train, test, _ = load_splits(cfg)
    assert (len(train), len(test)) == (100, 10)
    cfg = DataConfig(path=str(synthetic_data), cache_dir=str(tmp_path / "c"), val_size=56)
    train, val, name = load_splits(cfg)
    again, val_again, _ = load_splits(cfg)
    assert name == "validation" and (len(train), len(val)) == (200, 56)
    assert torch.equal(val.images, val_again.images) and torch.equal(train.labels, again.labels)
    # held out means held out: no training image is evaluated, and together they are the whole training split
    everything, _, _ = load_splits(DataConfig(path=str(synthetic_data), cache_dir=str(tmp_path / "c")))

    def rows(split):
        return [(image.numpy().tobytes(), int(label)) for image, label in zip(split.images, split.labels)]

    assert len(set(rows(everything))) == 256  # every synthetic image is distinct: rows identify images
    overlap = set(rows(train)) & set(rows(val))
    assert not overlap, f"{len(overlap)} validation images are also training images"
    assert sorted(rows(train) + rows(val)) == sorted(rows(everything))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(column="image"), "no column(s) ['img']"),
        (dict(size=28), "row 0: image has shape (3, 28, 28)"),
        (dict(mode="L"), "row 0: image has shape"),
        (dict(bad_label=10), "row 3: label 10 is outside 0..9"),
    ],
)
def test_bad_datasets_are_named(tmp_path, kwargs, message):
    folder = write_parquet_dataset(tmp_path / "bad", train_rows=8, test_rows=4, **kwargs)
    with pytest.raises(
        DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        load_splits(DataConfig(path=str(folder), cache_dir=str(tmp_path / "c")))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(path=str(tmp_path / "nope")))


def test_offline_hub_without_cache_fails_fast_and_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached; HF_HUB_OFFLINE=1 (conftest)
    started = time.monotonic()
    with pytest.raises(DataError, match="--data.path"):
        load_splits(DataConfig(name="uoft-cs/cifar10", cache_dir=str(tmp_path)))
    assert time.monotonic() - started < 15  # not a minute of retries


def _uint8_batch(n=16, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_augmentation_shapes_and_per_sample_crops():
    cfg = DataConfig()
    same = _uint8_batch(1).expand(64, -1, -1, -1).contiguous()
    out = augment(same, augment_params(64, cfg, torch.Generator().manual_seed(0), "cpu"), cfg)
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    distinct = {tuple(img.flatten()[:200].tolist()) for img in out}
    assert len(distinct) > 20  # every image its own crop offset and flip


def test_flip_is_a_flip_and_centred_crop_is_identity():
    cfg = DataConfig(augment=["crop", "hflip"])
    x = _uint8_batch(8)
    params = augment_params(8, cfg, torch.Generator().manual_seed(0), "cpu")
    params["dx"][:] = params["dy"][:] = cfg.crop_padding
    params["hflip"][:] = False
    plain = augment(x, params, cfg)
    torch.testing.assert_close(plain, data.normalize(x))
    params["hflip"][:] = True
    torch.testing.assert_close(augment(x, params, cfg), data.normalize(x).flip(3))
    params["hflip"][:] = False
    params["dx"][:] = 0  # shift right by the padding: the left columns are zero padding
    shifted = augment(x, params, cfg)
    torch.testing.assert_close(shifted[..., 4:], plain[..., :-4])
    torch.testing.assert_close(shifted[..., :4], data.normalize(torch.zeros_like(x))[..., :4])


def test_reflect_padding_fills_the_crop_s_border_with_the_image_mirrored_at_its_edge():
    cfg = DataConfig(augment=["crop"], crop_padding=4, crop_padding_mode="reflect")
    x = _uint8_batch(2)
    # image 0 moved right by 4 and down by 4 (dx = dy = 0); image 1 left by 4 and up by 4 (dx = dy = 8)
    out = augment(x, _params(2, cfg, dx=[0, 8], dy=[0, 8]), cfg)
    # reflection without repeating the edge pixel: padded column j < 4 holds column 4 - j, by hand
    expected0 = torch.empty(3, 32, 32, dtype=torch.uint8)
    rows = [4 - r if r < 4 else r - 4 for r in range(32)]
    cols = [4 - c if c < 4 else c - 4 for c in range(32)]
    for r, source_row in enumerate(rows):
        expected0[:, r] = x[0, :, source_row, cols]
    torch.testing.assert_close(out[0], _standardise(expected0[None].float() / 255)[0])
    # image 1's last column is padded column 39 of 40, which reflects column 27 of the image; its rows 0-27 are
    # the image's rows 4-31
    last_column = _standardise(x[1:2, :, 4:, 27:28].float() / 255)[0, :, :, 0]
    torch.testing.assert_close(out[1, :, :28, 31], last_column)
    zeros_cfg = DataConfig(augment=["crop"], crop_padding=4)
    zeros = augment(x, _params(2, zeros_cfg, dx=[0, 8], dy=[0, 8]), zeros_cfg)
    assert not torch.equal(zeros, out)  # the two modes differ (their centres agree: the plain test above)


def test_test_time_views_are_the_images_their_mirrors_and_one_pixel_shifts_of_each():
    x = _uint8_batch(3)
    assert [torch.equal(v, x) for v in data.tta_views(x, hflip=False, translate=False)] == [True]
    plain, mirror = data.tta_views(x, hflip=True, translate=False)
    assert torch.equal(plain, x) and torch.equal(mirror, x.flip(3))
    views = data.tta_views(x, hflip=True, translate=True)
    assert len(views) == 6
    for view, (source, shift) in zip(views[2:], [(x, -1), (x, 1), (x.flip(3), -1), (x.flip(3), 1)]):
        # shift -1: pixel (r, c) comes from (r + 1, c + 1), the last row and column reflected (they hold row and
        # column 30); shift +1: from (r - 1, c - 1), the first row and column holding row and column 1
        if shift == -1:
            torch.testing.assert_close(view[..., :31, :31], source[..., 1:, 1:])
            torch.testing.assert_close(view[..., 31, :31], source[..., 30, 1:])
        else:
            torch.testing.assert_close(view[..., 1:, 1:], source[..., :31, :31])
            torch.testing.assert_close(view[..., 0, 1:], source[..., 1, :31])


def test_normalize_matches_hand_computed_pixels():
    # One pixel (R, G, B) = (255, 0, 128): (255/255 - 0.4914)/0.2470, (0 - 0.4822)/0.2435, (128/255 - 0.4465)/0.2616.
    pixel = torch.tensor([255, 0, 128], dtype=torch.uint8).view(1, 3, 1, 1)
    expected = torch.tensor([2.0591093, -1.9802875, 0.2120061]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(pixel), expected)
    torch.testing.assert_close(normalize(pixel.float() / 255), expected)  # floats in [0, 1] are not divided again
    # (10, 200, 77): -1.8307057, 1.2407135, -0.5525199
    other = torch.tensor([10, 200, 77], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    expected = torch.tensor([-1.8307057, 1.2407135, -0.5525199]).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize(other), expected.expand(2, 3, 4, 4))


def _params(batch, cfg, **fixed):
    """Drawn parameters with some set by hand (a scalar for every image, or one value per image)."""
    params = augment_params(batch, cfg, torch.Generator().manual_seed(0), "cpu")
    for key, value in fixed.items():
        params[key] = torch.as_tensor(value, dtype=params[key].dtype).expand_as(params[key]).clone()
    return params


def test_hflip_and_vflip_are_flips_of_width_and_height():
    x = _uint8_batch(4)
    for flips, dims in (
        (dict(hflip=True, vflip=False), [3]),
        (dict(hflip=False, vflip=True), [2]),
        (dict(hflip=True, vflip=True), [2, 3]),
        (dict(hflip=False, vflip=False), []),
    ):
        cfg = DataConfig(augment=["hflip", "vflip"])
        out = augment(x, _params(4, cfg, **flips), cfg)
        torch.testing.assert_close(out, _standardise(torch.flip(x, dims).float() / 255), msg=str(flips))
    # A single white pixel at row 2, column 5 of a black image: hflip moves it to column 31 - 5 = 26, vflip to row 29.
    dot = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    dot[0, :, 2, 5] = 255
    cfg = DataConfig(augment=["hflip", "vflip"])
    flipped = augment(dot, _params(1, cfg, hflip=True, vflip=False), cfg)
    assert (flipped[0, 0] > 0).nonzero().tolist() == [[2, 26]]
    flipped = augment(dot, _params(1, cfg, hflip=False, vflip=True), cfg)
    assert (flipped[0, 0] > 0).nonzero().tolist() == [[29, 5]]


def test_flips_are_per_image():
    cfg = DataConfig(augment=["hflip"])
    x = _uint8_batch(4)
    out = augment(x, _params(4, cfg, hflip=[True, False, False, True]), cfg)
    expected = torch.stack([x[0].flip(2), x[1], x[2], x[3].flip(2)])
    torch.testing.assert_close(out, _standardise(expected.float() / 255))


def test_crop_is_a_window_of_the_zero_padded_image_at_dx_dy():
    pad = 4
    cfg = DataConfig(augment=["crop"], crop_padding=pad)
    x = _uint8_batch(6)
    dx, dy = [0, 8, 1, 6, 4, 3], [5, 2, 8, 0, 4, 7]  # per image, dx != dy, the extremes 0 and 2 * pad included
    out = augment(x, _params(6, cfg, dx=dx, dy=dy), cfg)
    padded = torch.zeros(6, 3, 32 + 2 * pad, 32 + 2 * pad, dtype=torch.uint8)
    padded[:, :, pad : pad + 32, pad : pad + 32] = x
    for k in range(6):
        window = padded[k, :, dy[k] : dy[k] + 32, dx[k] : dx[k] + 32]  # dy picks rows, dx picks columns
        torch.testing.assert_close(out[k], _standardise(window.float() / 255)[0], msg=f"image {k}")
    # By hand for image 0 (dx 0, dy 5): moved right by 4 and up by 1; the first 4 columns and the last row are black.
    black = _standardise(torch.zeros(1, 3, 1, 1))[0]
    torch.testing.assert_close(out[0, :, :, :pad], black.expand(3, 32, pad))
    torch.testing.assert_close(out[0, :, 31, :], black[:, 0].expand(3, 32))
    torch.testing.assert_close(out[0, :, :31, pad:], _standardise(x[0:1, :, 1:, :28].float() / 255)[0])


def test_rotation_by_90_degrees_is_rot90_counter_clockwise():
    # With align_corners=False a quarter turn maps every output pixel centre onto an input pixel centre,
    # so bilinear sampling is exact (up to float rounding of cos(pi/2)) over the whole image.
    cfg = DataConfig(augment=["rotate"], rotate_degrees=90)
    x = _uint8_batch(3)
    out = augment(x, _params(3, cfg, angle=[math.pi / 2, 0.0, -math.pi / 2]), cfg)
    torch.testing.assert_close(out[0], _standardise(torch.rot90(x[0:1], 1, (2, 3)).float() / 255)[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], _standardise(x[1:2].float() / 255)[0])  # angle 0: untouched
    torch.testing.assert_close(
        out[2], _standardise(torch.rot90(x[2:3], -1, (2, 3)).float() / 255)[0], atol=1e-4, rtol=0
    )
    # By hand: +90 degrees moves the top-right corner pixel to the top-left.
    dot = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    dot[0, :, 0, 31] = 255
    turned = augment(dot, _params(1, cfg, angle=math.pi / 2), cfg)
    assert (turned[0, 0] > 0).nonzero().tolist() == [[0, 0]]
    # 45 degrees: the corners come from outside the image and are filled with black (zeros), not stretched edges.
    white = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    tilted = augment(white, _params(1, cfg, angle=math.pi / 4), cfg)
    torch.testing.assert_close(tilted[0, :, 0, 0], _standardise(torch.zeros(1, 3, 1, 1)).flatten())
    torch.testing.assert_close(tilted[0, :, 16, 16], _standardise(torch.ones(1, 3, 1, 1)).flatten())


def _luma(x):
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


@pytest.mark.parametrize(
    "b, c, s",
    [
        (1.3, 1.0, 1.0),
        (0.6, 1.0, 1.0),
        (1.0, 0.5, 1.0),
        (1.0, 1.4, 1.0),
        (1.0, 1.0, 0.0),
        (1.0, 1.0, 1.6),
        (1.2, 0.7, 1.3),
    ],
)
def test_color_jitter_matches_the_hand_formulas(b, c, s):
    cfg = DataConfig(augment=["color_jitter"])
    x = _uint8_batch(4)
    out = augment(x, _params(4, cfg, jitter=[b, c, s]), cfg)
    y = x.float() / 255 * b  # brightness: scale
    mean = _luma(y).mean((2, 3), keepdim=True)  # contrast: about the mean grey level of the image
    y = (y - mean) * c + mean
    y = _luma(y) + (y - _luma(y)) * s  # saturation: away from each pixel's grey
    torch.testing.assert_close(out, _standardise(y.clamp(0, 1)), atol=2e-6, rtol=0)
    if (c, s) == (1.0, 1.0):
        torch.testing.assert_close(out, _standardise((x.float() / 255 * b).clamp(0, 1)), atol=2e-6, rtol=0)
    if s == 0.0:  # no saturation: grey, every channel the same luma
        grey = out * STD + MEAN
        torch.testing.assert_close(grey[:, 0], grey[:, 1], atol=2e-6, rtol=0)
        torch.testing.assert_close(grey[:, 1], grey[:, 2], atol=2e-6, rtol=0)


def test_color_jitter_factors_act_per_image():
    cfg = DataConfig(augment=["color_jitter"])
    x = _uint8_batch(1).expand(2, -1, -1, -1).contiguous()
    out = augment(x, _params(2, cfg, jitter=[[0.8, 1.0, 1.0], [1.2, 1.0, 1.0]]), cfg)
    torch.testing.assert_close(out[0], _standardise((x[:1].float() / 255 * 0.8).clamp(0, 1))[0], atol=2e-6, rtol=0)
    torch.testing.assert_close(out[1], _standardise((x[:1].float() / 255 * 1.2).clamp(0, 1))[0], atol=2e-6, rtol=0)


def test_augment_params_are_per_image_within_their_ranges_and_reproducible():
    cfg = DataConfig(
        augment=["crop", "hflip", "vflip", "rotate", "color_jitter"],
        crop_padding=4,
        rotate_degrees=15.0,
        color_jitter=0.2,
    )
    params = augment_params(512, cfg, torch.Generator().manual_seed(7), "cpu")
    for key in ("dx", "dy"):
        assert params[key].dtype == torch.int64 and set(params[key].tolist()) == set(range(9)), key  # 0..2 * pad
    assert not torch.equal(params["dx"], params["dy"])  # two independent draws
    for key in ("hflip", "vflip"):
        assert params[key].dtype == torch.bool and 0.4 < params[key].float().mean() < 0.6, key
    assert not torch.equal(params["hflip"], params["vflip"])
    limit = math.radians(15.0)
    assert params["angle"].abs().max() <= limit
    assert params["angle"].min() < -0.9 * limit and params["angle"].max() > 0.9 * limit
    assert params["jitter"].shape == (512, 3)
    assert params["jitter"].min() >= 0.8 and params["jitter"].max() <= 1.2
    for column in params["jitter"].unbind(1):  # brightness, contrast and saturation each span the range
        assert column.min() < 0.82 and column.max() > 1.18
    assert not torch.equal(params["jitter"][:, 0], params["jitter"][:, 1])
    assert len(set(params["angle"].tolist())) == 512  # every image its own angle
    again = augment_params(512, cfg, torch.Generator().manual_seed(7), "cpu")
    assert all(torch.equal(params[k], again[k]) for k in params)
    other = augment_params(512, cfg, torch.Generator().manual_seed(8), "cpu")
    assert not torch.equal(params["dx"], other["dx"]) and not torch.equal(params["angle"], other["angle"])


def test_cutout_sets_a_square_to_the_mean_colour_cut_off_at_the_edges():
    cfg = DataConfig(augment=["cutout"], cutout_size=6)
    x = _uint8_batch(3)
    # centres (row, column) as fractions of 32: (16, 8) inside; (1, 30) over the top and right edges; (0, 0)
    centres = [[16 / 32, 8 / 32], [1 / 32, 30 / 32], [0.0, 0.0]]
    out = augment(x, _params(3, cfg, cutout=centres), cfg)
    expected = _standardise(x.float() / 255)
    expected[0, :, 13:19, 5:11] = 0.0  # rows 16-3 .. 16+2, columns 8-3 .. 8+2: 6 x 6
    expected[1, :, 0:4, 27:32] = 0.0  # rows -2 .. 3 and columns 27 .. 32, cut off at the edges: 4 x 5
    expected[2, :, 0:3, 0:3] = 0.0  # rows and columns -3 .. 2: 3 x 3
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert [int((image == 0).all(0).sum()) for image in out] == [36, 20, 9]
    # 0 after normalising is the dataset's mean colour: a pixel of exactly that colour is what the square holds
    torch.testing.assert_close(_standardise(MEAN), torch.zeros(1, 3, 1, 1))


def test_cutout_is_drawn_after_every_other_parameter():
    # Adding cutout must not move any earlier draw: every run of an earlier recipe stays as it was, bit for bit.
    cfg = DataConfig(augment=["crop", "hflip", "cutout"], crop_padding=4, color_jitter=0.2)
    params = augment_params(64, cfg, torch.Generator().manual_seed(5), "cpu")
    generator = torch.Generator().manual_seed(5)
    by_hand = [torch.randint(0, 9, (64,), generator=generator), torch.randint(0, 9, (64,), generator=generator)]
    by_hand += [torch.rand(64, generator=generator) for _ in range(3)] + [torch.rand(64, 3, generator=generator)]
    assert torch.equal(params["dx"], by_hand[0]) and torch.equal(params["dy"], by_hand[1])
    assert torch.equal(params["hflip"], by_hand[2] < 0.5)
    assert torch.equal(params["jitter"], 1 + (by_hand[5] * 2 - 1) * 0.2)
    assert torch.equal(params["cutout"], torch.rand(64, 2, generator=generator))


def test_augmentations_left_out_of_the_config_do_nothing():
    cfg = DataConfig(augment=[], crop_padding=4)
    params = augment_params(256, cfg, torch.Generator().manual_seed(0), "cpu")
    assert (params["dx"] == 0).all() and (params["dy"] == 0).all()
    assert not params["hflip"].any() and not params["vflip"].any()
    x = _uint8_batch(8)
    torch.testing.assert_close(
        augment(x, augment_params(8, cfg, torch.Generator().manual_seed(0), "cpu"), cfg), _standardise(x.float() / 255)
    )


def _batches(train, world, rank, accum, cfg=None):
    return TrainBatches(
        train,
        cfg or DataConfig(),
        batch_size=32,
        grad_accum_steps=accum,
        rank=rank,
        world_size=world,
        seed=3,
        device="cpu",
        layout=torch.contiguous_format,
    )


def test_epoch_uses_every_sample_once_apart_from_drop_last():
    train = data.Split(_uint8_batch(100), torch.arange(100))
    batches = _batches(train, 1, 0, 1)
    seen = torch.cat([labels for _, micro in batches.epoch(0) for _, labels in micro])
    assert len(seen) == 96 and len(set(seen.tolist())) == 96  # 100 % 32 = 4 dropped
    other_epoch = torch.cat([labels for _, micro in batches.epoch(1) for _, labels in micro])
    assert not torch.equal(seen, other_epoch)


@pytest.mark.parametrize("hflip_mode", ["random", "alternate"])
def test_global_batch_is_identical_whatever_the_ranks_and_accumulation(hflip_mode):
    train, cfg = data.Split(_uint8_batch(100), torch.arange(100)), DataConfig(hflip_mode=hflip_mode)
    single = [(x, y) for _, micro in _batches(train, 1, 0, 1, cfg).epoch(1, start_step=1) for x, y in micro]
    for world, accum in ((2, 1), (2, 2), (1, 4)):
        ranks = [
            [(x, y) for _, micro in _batches(train, world, r, accum, cfg).epoch(1, start_step=1) for x, y in micro]
            for r in range(world)
        ]
        # Reassemble each step's global batch: micro-batch m of rank r sits at (m * world + r).
        for step in range(len(single)):
            parts = [ranks[r][step * accum + m] for m in range(accum) for r in range(world)]
            assert torch.equal(torch.cat([p[1] for p in parts]), single[step][1])
            assert torch.equal(torch.cat([p[0] for p in parts]), single[step][0])


def _mirrored_per_image(batches: TrainBatches, epoch: int, x: torch.Tensor) -> torch.Tensor:
    """Per training image (its label is its index): 1 if it came out mirrored in `epoch`, -1 if not, 0 if the epoch
    left it out (drop_last)."""
    flipped = torch.zeros(len(x), dtype=torch.int64)
    for _, micro in batches.epoch(epoch):
        for images, labels in micro:
            for image, index in zip(images, labels):
                plain = _standardise(x[index].float() / 255)
                mirror = _standardise(x[index].flip(-1).float() / 255)
                assert torch.allclose(image, plain) != torch.allclose(image, mirror)
                flipped[index] = 1 if torch.allclose(image, mirror) else -1
    return flipped


@pytest.mark.parametrize("mode", ["random", "alternate"])
def test_alternating_flip_shows_each_image_the_other_way_in_the_next_epoch(mode):
    x = _uint8_batch(100, seed=2)
    batches = _batches(data.Split(x, torch.arange(100)), 1, 0, 1, DataConfig(augment=["hflip"], hflip_mode=mode))
    epochs = [_mirrored_per_image(batches, epoch, x) for epoch in range(3)]
    for first, second in zip(epochs, epochs[1:]):
        seen_in_both = (first != 0) & (second != 0)
        opposite = (first == -second)[seen_in_both]
        assert len(opposite) > 80
        assert opposite.all() if mode == "alternate" else 0.2 < opposite.float().mean() < 0.8
    assert 20 < (epochs[0] == 1).sum() < 76  # about half of the 96 seen are mirrored in the first epoch


def test_the_seed_recipes_augmentations_compose_per_image_in_order():
    """All five of configs/seed.yaml's augmentations at once, each image its own parameters: crop and flips,
    then colour jitter, then rotation, built by hand for every image, and the batch the same as each image alone."""
    cfg = DataConfig(augment=["crop", "hflip", "vflip", "rotate", "color_jitter"], crop_padding=4)
    x = _uint8_batch(3, seed=5)
    dx, dy, hflip, vflip = [0, 4, 8], [8, 4, 1], [True, False, True], [False, True, True]
    angle, jitter = [math.pi / 2, 0.0, -math.pi / 2], [[1.2, 0.8, 1.3], [0.9, 1.1, 0.7], [1.0, 1.0, 0.0]]
    params = _params(3, cfg, dx=dx, dy=dy, hflip=hflip, vflip=vflip, angle=angle)
    params["jitter"] = torch.tensor(jitter)
    out = augment(x, params, cfg)
    padded = torch.zeros(3, 3, 40, 40, dtype=torch.uint8)
    padded[:, :, 4:36, 4:36] = x
    for k in range(3):
        y = padded[k : k + 1, :, dy[k] : dy[k] + 32, dx[k] : dx[k] + 32].float() / 255  # the crop window
        y = y.flip(3) if hflip[k] else y
        y = y.flip(2) if vflip[k] else y
        b, c, s = jitter[k]
        y = y * b
        mean = _luma(y).mean((2, 3), keepdim=True)
        y = (y - mean) * c + mean
        y = (_luma(y) + (y - _luma(y)) * s).clamp(0, 1)
        y = torch.rot90(y, round(angle[k] / (math.pi / 2)), (2, 3))  # counter-clockwise for a positive angle
        torch.testing.assert_close(out[k : k + 1], _standardise(y), atol=1e-4, rtol=0, msg=f"image {k}")
        alone = augment(x[k : k + 1], {key: value[k : k + 1] for key, value in params.items()}, cfg)
        torch.testing.assert_close(out[k : k + 1], alone)


def test_augmentation_is_a_function_of_seed_epoch_and_step():
    """Every step of an epoch draws its own augmentation, and the same (seed, epoch, step) always draws the same:
    with every training image the same, the batches differ only by their augmentation."""
    image = _uint8_batch(1, seed=9).expand(60, -1, -1, -1).contiguous()
    train = data.Split(image, torch.zeros(60, dtype=torch.int64))

    def batches(seed):
        return TrainBatches(
            train,
            DataConfig(),  # crop and horizontal flip
            batch_size=12,
            grad_accum_steps=1,
            rank=0,
            world_size=1,
            seed=seed,
            device="cpu",
            layout=torch.contiguous_format,
        )

    def images(source, step):
        ((batch, _),) = list(source.at_step(step))
        return batch

    first = batches(seed=3)
    assert first.steps_per_epoch == 5
    epoch0 = [images(first, step) for step in range(5)]
    for i in range(5):
        for j in range(i):
            assert not torch.equal(epoch0[i], epoch0[j]), f"steps {j} and {i} of one epoch are augmented alike"
    again = batches(seed=3)  # a fresh object (a resumed run): nothing but the step decides
    for step in (3, 7, 1):
        assert torch.equal(images(again, step), images(first, step))
    assert not torch.equal(images(first, 5 + 2), epoch0[2])  # the same position in the next epoch
    assert not torch.equal(images(batches(seed=4), 2), epoch0[2])  # another seed
