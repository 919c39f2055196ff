"""CIFAR-10 from Hugging Face `datasets`, decoded once to uint8 tensors, augmented in batches on the device.

The whole training set lives on the training device as uint8 [N, 3, 32, 32]. Each epoch is one
global permutation (seeded by seed and epoch); each optimizer step takes the next `batch_size`
indices of it and every rank takes its own slice. Augmentation parameters are drawn for the whole
global batch from a generator seeded by (seed, epoch, step), so a batch is augmented the same way
whatever the number of processes or accumulation steps, and resuming at step s needs no saved
data-loader state.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distcifar.config import DataConfig
from distcifar.errors import DataError, one_line
from distcifar.files import follow_umask, replaced_atomically

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> Split:
        return Split(self.images[:n], self.labels[:n]) if n else self


# ---------------------------------------------------------------------------------------------
# Loading


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers, asked through huggingface_hub's own HTTP client, so that HTTPS_PROXY,
    HTTP_PROXY, NO_PROXY and HF_ENDPOINT count exactly as they will for the download itself."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        response = get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport failure (DNS, refused, proxy, TLS, timeout) means: not reachable
        return False
    return response.status_code < 500 and response.status_code != 407  # 407: the proxy wants credentials


@contextlib.contextmanager
def _hub_offline():
    """datasets' own offline mode: use the HF cache, never retry the network."""
    import datasets
    import huggingface_hub.constants

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def load_dataset_dict(cfg: DataConfig):
    """The raw `datasets.DatasetDict` from --data.path or the hub."""
    import datasets

    # A local folder whose README has no YAML header is common and harmless: no warning about it.
    logging.getLogger("huggingface_hub.repocard").setLevel(logging.ERROR)

    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not path.exists():
            raise DataError(
                f"data.path '{cfg.path}' does not exist; give a folder of parquet files, a file, "
                "or a save_to_disk folder"
            )
        try:
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                loaded = datasets.load_from_disk(str(path))
            elif path.is_file():
                loaded = datasets.load_dataset(path.suffix.lstrip(".") or "parquet", data_files={"train": str(path)})
            else:
                loaded = datasets.load_dataset(str(path))
        except Exception as err:  # datasets raises many types; the message is what matters
            raise DataError(f"could not read a dataset from '{cfg.path}': {err}") from None
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})

    offline = datasets.config.HF_HUB_OFFLINE or not _hub_reachable()
    hint = (
        "point at a local copy with --data.path DIR (a folder with train/test parquet files or a "
        "save_to_disk folder), or run once with network access to fill the Hugging Face cache"
    )
    try:
        with _hub_offline() if offline else contextlib.nullcontext():
            return datasets.load_dataset(cfg.name)
    except (ConnectionError, FileNotFoundError, OSError) as err:
        why = "the Hugging Face hub cannot be reached" if offline else "loading from the hub failed"
        raise DataError(
            f"dataset '{cfg.name}': {why} and it is not in the cache ({type(err).__name__}); {hint}"
        ) from None


def _decode(ds, split_name: str, num_classes: int) -> Split:
    missing = {"img", "label"} - set(ds.column_names)
    if missing:
        raise DataError(
            f"split '{split_name}' has no column(s) {sorted(missing)} (found {ds.column_names}); "
            "distcifar expects the hub's cifar10 schema: 'img' (Image) and 'label' (ClassLabel)"
        )
    labels = torch.as_tensor(ds["label"], dtype=torch.int64)
    bad = ((labels < 0) | (labels >= num_classes)).nonzero()
    if len(bad):
        row = bad[0].item()
        raise DataError(f"split '{split_name}' row {row}: label {labels[row].item()} is outside 0..{num_classes - 1}")
    images = ds.with_format("torch")["img"][:]
    if not isinstance(images, torch.Tensor) or images.shape[1:] != (3, 32, 32):
        for row, image in enumerate(images):
            if image.shape != (3, 32, 32):
                raise DataError(
                    f"split '{split_name}' row {row}: image has shape {tuple(image.shape)} (channels, height, width); "
                    "every image must be 32x32 RGB"
                )
    return Split(images.to(torch.uint8).contiguous(), labels)


def cache_root(cfg: DataConfig) -> Path:
    """--data.cache_dir, else $DISTCIFAR_CACHE, else $XDG_CACHE_HOME/distcifar, else ~/.cache/distcifar."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    if os.environ.get("DISTCIFAR_CACHE"):
        return Path(os.environ["DISTCIFAR_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "distcifar"


def _cache_key(ds, num_classes: int) -> str | None:
    """A key that changes whenever the split's data does: its Arrow files (path, size, modification time),
    as `datasets` lists them publicly in `ds.cache_files`. None for an in-memory dataset (no files)."""
    files = [entry["filename"] for entry in ds.cache_files]
    if not files:
        return None
    digest = hashlib.sha256(f"distcifar decoded v1, {num_classes} classes, {len(ds)} rows\n".encode())
    for name in files:
        stat = os.stat(name)
        digest.update(f"{os.path.abspath(name)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def decoded_split(ds, split_name: str, cfg: DataConfig, num_classes: int) -> Split:
    """Decode a split once and cache it as safetensors, keyed by the dataset's files (see _cache_key)."""
    key = _cache_key(ds, num_classes)
    if key is None:
        return _decode(ds, split_name, num_classes)
    cache = cache_root(cfg) / f"{split_name}-{key}.safetensors"
    if cache.exists():
        try:
            tensors = load_file(cache)
            return Split(tensors["images"], tensors["labels"])
        except (SafetensorError, OSError, KeyError) as err:  # the cache is disposable: decode again
            reason = one_line(err, 200)
            print(f"warning: decoding {split_name} again: its cache {cache} is damaged ({reason})", flush=True)
    split = _decode(ds, split_name, num_classes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(cache) as temporary:  # a reader sees the whole file or none
        save_file({"images": split.images, "labels": split.labels}, temporary)
        follow_umask(temporary)
    return split


def load_splits(cfg: DataConfig, num_classes: int = 10) -> tuple[Split, Split, str]:
    """(train, eval, eval split name). Call under accelerator.main_process_first()."""
    dsd = load_dataset_dict(cfg)
    if "train" not in dsd:
        raise DataError(f"the dataset has no 'train' split (found {list(dsd)})")
    train = decoded_split(dsd["train"], "train", cfg, num_classes)
    if cfg.val_size:
        if cfg.val_size >= len(train):
            raise DataError(f"data.val_size ({cfg.val_size}) must be smaller than the training set ({len(train)})")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234))
        val_idx, train_idx = order[: cfg.val_size].sort().values, order[cfg.val_size :].sort().values
        evaluation = Split(train.images[val_idx], train.labels[val_idx])
        train, eval_name = Split(train.images[train_idx], train.labels[train_idx]), "validation"
    else:
        eval_name = "test" if "test" in dsd else None
        if eval_name is None:
            raise DataError(
                f"the dataset has no 'test' split (found {list(dsd)}); "
                "set --data.val_size N to hold out N training images"
            )
        evaluation = decoded_split(dsd[eval_name], eval_name, cfg, num_classes)
    return train.head(cfg.train_limit), evaluation.head(cfg.eval_limit), eval_name


# ---------------------------------------------------------------------------------------------
# Batching and augmentation on the device


_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images, or floats in [0, 1], standardised with the CIFAR-10 mean and std."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    if x.device not in _MEAN_STD:  # made once per device: a host-to-device copy per call would sync a GPU
        _MEAN_STD[x.device] = (
            torch.tensor(CIFAR10_MEAN, device=x.device).view(1, 3, 1, 1),
            torch.tensor(CIFAR10_STD, device=x.device).view(1, 3, 1, 1),
        )
    mean, std = _MEAN_STD[x.device]
    return (x - mean) / std


def augment_params(batch: int, cfg: DataConfig, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Random parameters for `batch` images, drawn in a fixed order so slices are reproducible."""
    pad = cfg.crop_padding if "crop" in cfg.augment else 0
    shape = dict(generator=generator, device=device)
    params = {
        "dx": torch.randint(0, 2 * pad + 1, (batch,), **shape),
        "dy": torch.randint(0, 2 * pad + 1, (batch,), **shape),
        "hflip": torch.rand(batch, **shape) < 0.5,
        "vflip": torch.rand(batch, **shape) < 0.5,
        "angle": (torch.rand(batch, **shape) * 2 - 1) * math.radians(cfg.rotate_degrees),
        "jitter": 1 + (torch.rand(batch, 3, **shape) * 2 - 1) * cfg.color_jitter,
        # drawn last, so that adding it left every earlier draw (and every earlier recipe's run) as it was
        "cutout": torch.rand(batch, 2, **shape),  # the square's centre (row, column) as a fraction of the size
    }
    params["hflip"] &= "hflip" in cfg.augment
    params["vflip"] &= "vflip" in cfg.augment
    return params


_PAD_MODES = {"zeros": "constant", "reflect": "reflect"}  # data.crop_padding_mode -> F.pad's name for it


def augment(images: torch.Tensor, params: dict[str, torch.Tensor], cfg: DataConfig) -> torch.Tensor:
    """uint8 [B,3,32,32] -> normalized float. Crop and flips are one gather, cutout one mask; every image its own
    offsets."""
    batch, size = images.shape[0], images.shape[-1]
    pad = cfg.crop_padding if "crop" in cfg.augment else 0
    padded = F.pad(images, (pad, pad, pad, pad), mode=_PAD_MODES[cfg.crop_padding_mode]) if pad else images
    ramp = torch.arange(size, device=images.device)
    cols = params["dx"][:, None] + torch.where(params["hflip"][:, None], size - 1 - ramp, ramp)
    rows = params["dy"][:, None] + torch.where(params["vflip"][:, None], size - 1 - ramp, ramp)
    index = torch.arange(batch, device=images.device)[:, None, None]
    x = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    x = x.permute(0, 3, 1, 2).float() / 255
    if "color_jitter" in cfg.augment:
        brightness, contrast, saturation = params["jitter"].unbind(1)
        x = x * brightness[:, None, None, None]
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        x = (x - gray.mean((2, 3), keepdim=True)) * contrast[:, None, None, None] + gray.mean((2, 3), keepdim=True)
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
        x = (gray + (x - gray) * saturation[:, None, None, None]).clamp(0, 1)
    if "rotate" in cfg.augment:
        cos, sin, zero = params["angle"].cos(), params["angle"].sin(), torch.zeros_like(params["angle"])
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    x = normalize(x)
    if "cutout" in cfg.augment:  # after normalising: the square holds 0, the dataset's mean colour
        start = (params["cutout"] * size).long() - cfg.cutout_size // 2  # [B, 2]: the square's top and left
        inside = (ramp >= start[:, :, None]) & (ramp < start[:, :, None] + cfg.cutout_size)  # [B, 2, size]
        x = x.masked_fill((inside[:, 0, :, None] & inside[:, 1, None, :])[:, None], 0.0)
    return x


def mirrored(images: torch.Tensor) -> torch.Tensor:
    """Each image flipped left to right."""
    return images.flip(-1)


def translated(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Each image moved by (dy, dx) pixels, the uncovered edge filled by reflection (as reflect-padded crops are)."""
    size, pad = images.shape[-1], max(abs(dy), abs(dx))
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    return padded[..., pad - dy : pad - dy + size, pad - dx : pad - dx + size]


def tta_views(images: torch.Tensor, hflip: bool, translate: bool) -> list[torch.Tensor]:
    """The views of a batch that test-time augmentation averages: the images, with `hflip` their mirror images,
    with `translate` each of those moved one pixel up-left and one down-right."""
    views = [images, mirrored(images)] if hflip else [images]
    if translate:
        views += [translated(view, shift, shift) for view in views for shift in (-1, 1)]
    return views


class TrainBatches:
    """Per-rank micro-batches of the device-resident training set for any global optimizer step.

    Epoch and position come from the step, so resuming needs nothing but the step. Within an epoch
    every sample is used once across all ranks, except the last `len(train) % batch_size` of that
    epoch's permutation, which are dropped (drop_last) so that every step sees a full global batch.
    """

    def __init__(
        self,
        train: Split,
        cfg: DataConfig,
        *,
        batch_size: int,
        grad_accum_steps: int,
        rank: int,
        world_size: int,
        seed: int,
        device,
        layout: torch.memory_format = torch.contiguous_format,
    ):
        if batch_size % (grad_accum_steps * world_size):
            raise DataError(
                f"train.batch_size ({batch_size}) must be divisible by processes x grad_accum_steps "
                f"({world_size} x {grad_accum_steps})"
            )
        if len(train) < batch_size:
            raise DataError(f"the training set ({len(train)} images) is smaller than one global batch ({batch_size})")
        self.images, self.labels = train.images.to(device), train.labels.to(device)
        self.cfg, self.seed, self.device = cfg, seed, device
        self.batch_size, self.accum, self.rank, self.world = batch_size, grad_accum_steps, rank, world_size
        self.micro_batch = batch_size // (grad_accum_steps * world_size)
        self.steps_per_epoch = len(train) // batch_size
        self.layout = layout  # the network's input layout (engine: channels_last)
        self._generator = torch.Generator(device=device)
        self._order_epoch, self._order = -1, None
        # data.hflip_mode alternate: each image's mirroring in epoch 0, a function of the seed alone (offset by 2**32
        # so that it is none of permutation()'s seeds).
        if cfg.hflip_mode == "alternate":
            first_flips = torch.rand(len(train), generator=torch.Generator().manual_seed(2**32 + seed)) < 0.5
            self.first_flips = first_flips.to(device)

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.labels), generator=generator).to(self.device)

    def rank_indices(self, order: torch.Tensor, step: int, micro: int) -> tuple[slice, torch.Tensor]:
        """Where this rank's micro-batch sits in the global batch, and the sample indices."""
        start = micro * self.micro_batch * self.world + self.rank * self.micro_batch
        window = slice(start, start + self.micro_batch)
        return window, order[step * self.batch_size :][window]

    def at_step(self, step: int):
        """This rank's grad_accum_steps (images, labels) pairs of global optimizer step `step`, made lazily."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._order_epoch:
            self._order_epoch, self._order = epoch, self.permutation(epoch)
        self._generator.manual_seed(hash((self.seed, epoch, position)) & (2**62 - 1))
        params = augment_params(self.batch_size, self.cfg, self._generator, self.device)
        if self.cfg.hflip_mode == "alternate":  # replaces the random draw, which stays so later draws are unchanged
            indices = self._order[position * self.batch_size : (position + 1) * self.batch_size]
            params["hflip"] = self.first_flips[indices] ^ bool(epoch % 2)
        return self._micro_batches(self._order, position, params)

    def epoch(self, epoch: int, start_step: int = 0):
        """Yield (step in epoch, micro-batches) for the steps start_step.. of `epoch`."""
        for step in range(start_step, self.steps_per_epoch):
            yield step, self.at_step(epoch * self.steps_per_epoch + step)

    def _micro_batches(self, order: torch.Tensor, step: int, params: dict):
        for micro in range(self.accum):
            window, idx = self.rank_indices(order, step, micro)
            images = augment(self.images[idx], {k: v[window] for k, v in params.items()}, self.cfg)
            yield images.contiguous(memory_format=self.layout), self.labels[idx]
