import time

import numpy as np
import pytest
import torch

import distcifar.data as data
from conftest import make_images, write_parquet_dataset
from distcifar.config import DataConfig
from distcifar.data import DataError, TrainBatches, augment, augment_params, load_splits


def test_parquet_in_the_hub_schema_loads_through_the_real_path(synthetic_data, tmp_path):
    train, test, name = load_splits(DataConfig(path=str(synthetic_data), cache_dir=str(tmp_path)))
    assert name == "test" and len(train) == 256 and len(test) == 101
    assert train.images.dtype == torch.uint8 and train.images.shape == (256, 3, 32, 32)
    assert train.labels.dtype == torch.int64 and 0 <= train.labels.min() <= train.labels.max() <= 9
    labels = np.random.default_rng(1).integers(0, 10, 256)
    expected = np.asarray(make_images([int(x) for x in labels[:1]], seed=1)[0])  # PNG-encoded: lossless
    assert torch.equal(train.images[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_decoded_split_is_cached_by_fingerprint(synthetic_data, tmp_path, monkeypatch):
    cfg = DataConfig(path=str(synthetic_data), cache_dir=str(tmp_path))
    first, _, _ = load_splits(cfg)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    monkeypatch.setattr(data, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    second, _, _ = load_splits(cfg)
    assert torch.equal(first.images, second.images)


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
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        load_splits(DataConfig(path=str(folder), cache_dir=str(tmp_path / "c")))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(path=str(tmp_path / "nope")))


@pytest.mark.parametrize("offline_env_var", ["1", None])
def test_unreachable_hub_fails_fast_and_says_what_to_do(monkeypatch, tmp_path, offline_env_var):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached
    if offline_env_var is None:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        monkeypatch.setattr(data, "_hub_reachable", lambda timeout=3.0: False)  # this machine has no hub anyway
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


def test_seed_augmentations_run_batched():
    cfg = DataConfig(augment=["crop", "hflip", "vflip", "rotate", "color_jitter"])
    out = augment(_uint8_batch(32), augment_params(32, cfg, torch.Generator().manual_seed(1), "cpu"), cfg)
    assert out.shape == (32, 3, 32, 32) and torch.isfinite(out).all()


def _batches(train, world, rank, accum):
    return TrainBatches(train, DataConfig(), batch_size=32, grad_accum_steps=accum, rank=rank, world_size=world,
                        seed=3, device="cpu", channels_last=False)


def test_epoch_uses_every_sample_once_apart_from_drop_last():
    train = data.Split(_uint8_batch(100), torch.arange(100))
    batches = _batches(train, 1, 0, 1)
    seen = torch.cat([labels for _, micro in batches.epoch(0) for _, labels in micro])
    assert len(seen) == 96 and len(set(seen.tolist())) == 96  # 100 % 32 = 4 dropped
    other_epoch = torch.cat([labels for _, micro in batches.epoch(1) for _, labels in micro])
    assert not torch.equal(seen, other_epoch)


def test_global_batch_is_identical_whatever_the_ranks_and_accumulation():
    train = data.Split(_uint8_batch(100), torch.arange(100))
    single = [(x, y) for _, micro in _batches(train, 1, 0, 1).epoch(0, start_step=1) for x, y in micro]
    for world, accum in ((2, 1), (2, 2), (1, 4)):
        ranks = [[(x, y) for _, micro in _batches(train, world, r, accum).epoch(0, start_step=1) for x, y in micro]
                 for r in range(world)]
        # Reassemble each step's global batch: micro-batch m of rank r sits at (m * world + r).
        for step in range(len(single)):
            parts = [ranks[r][step * accum + m] for m in range(accum) for r in range(world)]
            assert torch.equal(torch.cat([p[1] for p in parts]), single[step][1])
            assert torch.equal(torch.cat([p[0] for p in parts]), single[step][0])
