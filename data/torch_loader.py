"""ImageNet-folder loader on torch.utils.data with torchvision.io decoding and transforms v2.

Workers decode and augment to uint8; the float conversion and normalisation run on the device
after a pinned, non-blocking copy (4x fewer bytes over PCIe, as DLE does). Each sample is
augmented with its own seed from the sampler, so the images of a run do not depend on the
number of workers, the world size or where the run was resumed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from data import RankInfo, augment, folder
from data.sampler import GlobalBatchSampler, sample_seed, train_crop_at, val_range


def decode(data: np.ndarray) -> torch.Tensor:
    """Any JPEG (incl. CMYK, grayscale) or PNG, whatever its extension, as a uint8 RGB CHW tensor."""
    return decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB)


def train_transform(cfg, size: int) -> v2.Transform:
    """`data.crop`: random_resized (Inception/ImageNet) or pad (the ResNet paper's CIFAR crop:
    zero-pad `data.pad` px, cut a random `size` window; for images that are already `size` px);
    then the flip and `data.auto_augment` (data/augment.py). Random erasing comes after the
    normalisation, on the device (`ImageFolderDataset(erasing=...)`, `DeviceBatches`)."""
    if cfg.crop == "pad":
        crop = v2.RandomCrop(size, padding=cfg.pad, pad_if_needed=True)
    else:
        crop = v2.RandomResizedCrop(size, scale=(cfg.min_scale, 1.0), antialias=True)
    return v2.Compose([crop, *([v2.RandomHorizontalFlip()] if cfg.hflip else []), *augment.torch_auto_augment(cfg)])


def val_transform(resize: int, size: int) -> v2.Transform:
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])


class ImageFolderDataset(Dataset):
    """Reads (index, seed, size) keys from a `folder.Split`; an undecodable sample is replaced by
    the next readable one and flagged (`folder.first_readable`). `transform(size)` gives the
    augmentation for an output size (the size changes per epoch under progressive resizing).
    `erasing` > 0: each item also carries the box v2.RandomErasing(erasing) draws for it, from the
    same seed right after the transform (`augment.ErasingBox`); `DeviceBatches` erases it."""

    def __init__(self, split: folder.Split, transform: Callable[[int], v2.Transform], erasing: float = 0.0):
        self.split, self.make_transform, self.transforms = split, transform, {}
        self.erasing = augment.ErasingBox(p=erasing) if erasing else None
        self.nice = 0  # added to a worker's nice value when it starts (_init_worker)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple:  # image, label, read ok[, erase box]
        index, seed, size = key
        image, read = folder.first_readable(self.split, index, decode)
        # Seed the transform's draws, then give the caller its RNG back (workers=0). By hand on the
        # CPU generator: torch.random.fork_rng + torch.manual_seed cost 160 us per sample here
        # (they visit every accelerator backend), more than decoding a 28x28 JPEG.
        gen = torch.default_generator
        saved = gen.get_state()
        gen.manual_seed(seed)
        try:
            if size not in self.transforms:
                self.transforms[size] = self.make_transform(size)
            image = self.transforms[size](image)
            box = self.erasing.box(image) if self.erasing else None
        finally:
            gen.set_state(saved)
        item = image, self.split.label(read), read == index
        return item if box is None else (*item, box)


def collate(batch):
    """(uint8 images, labels, skipped count, erase boxes or None)."""
    images, labels, ok, *boxes = zip(*batch)
    return torch.stack(images), torch.tensor(labels), len(ok) - sum(ok), torch.stack(boxes[0]) if boxes else None


class DeviceBatches:
    """Moves uint8 batches to the device and normalises them there; counts skipped files."""

    def __init__(self, loader: DataLoader, device: torch.device, mean, std, channels_last: bool):
        """`mean`, `std` on the 0..255 scale (folder.normalisation)."""
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels, skipped, boxes in self.loader:
            self.skipped += skipped
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            images = (images.float() - self.mean) / self.std
            if boxes is not None:  # random erasing, on the normalised image (data/augment.py)
                images = augment.erase_(images, boxes)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels


class SizedKeys:
    """Sampler wrapper: adds the epoch's training resolution to every (index, seed) key."""

    def __init__(self, sampler: GlobalBatchSampler, size_at: Callable[[int], int]):
        self.sampler, self.size_at = sampler, size_at

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        size = self.size_at(self.sampler.epoch)
        return ((i, seed, size) for i, seed in self.sampler)


class TorchTrainLoader(DeviceBatches):
    def __init__(self, sampler: GlobalBatchSampler, **kw):
        super().__init__(**kw)
        self.sampler = sampler
        self.num_samples = sampler.n
        self.steps_per_epoch = sampler.steps_per_epoch

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_sample)

    def set_decode_nice(self, nice: int) -> None:
        """The workers' nice increment, before they start (train/hardware.py decides it)."""
        self.loader.dataset.nice = nice


class TorchValLoader(DeviceBatches):
    def __init__(self, num_samples: int, **kw):
        super().__init__(**kw)
        self.num_samples = num_samples


def _val(cfg, split: folder.Split, info: RankInfo, seed: int, common: dict, kw: dict) -> TorchValLoader:
    keys = [(i, sample_seed(seed, 0, i), cfg.val_crop) for i in val_range(len(split), info.rank, info.world_size)]
    loader = DataLoader(ImageFolderDataset(split, functools.partial(val_transform, cfg.val_resize)),
                        batch_size=folder.val_batch_size(cfg), sampler=keys, **common)
    return TorchValLoader(len(split), loader=loader, **kw)


def _common(cfg, info: RankInfo, channels_last: bool) -> tuple[dict, dict]:
    """(DataLoader arguments, DeviceBatches arguments) shared by the train and val loaders."""
    pin = cfg.pin_memory and info.device.type == "cuda"
    mean, std = folder.normalisation(cfg)
    return (dict(num_workers=cfg.workers, collate_fn=collate, pin_memory=pin, persistent_workers=cfg.workers > 0),
            dict(device=info.device, mean=mean, std=std, channels_last=channels_last))


def _init_worker(worker_id: int) -> None:
    """A decode worker beside intra-op threads on the same cores runs nicer (train/hardware.py
    `cpu_threads`), so that it decodes in their gaps instead of holding them up."""
    nice = torch.utils.data.get_worker_info().dataset.nice
    if nice:
        os.nice(nice)


def build(cfg, info: RankInfo, *, seed: int, channels_last: bool, batch: int | None = None):
    """(train loader, val loader, class names) for `cfg.root`, already sharded for this rank."""
    batch = batch or cfg.batch_size  # the train micro-batch (the trainer's split of the global batch)
    train_split, val_split = folder.open_splits(cfg)
    sampler = folder.train_sampler(cfg, train_split, info, seed, batch)
    common, kw = _common(cfg, info, channels_last)
    train = DataLoader(ImageFolderDataset(train_split, functools.partial(train_transform, cfg), cfg.random_erasing),
                       batch_size=batch, sampler=SizedKeys(sampler, lambda epoch: train_crop_at(cfg, epoch)),
                       drop_last=True, prefetch_factor=4 if cfg.workers else None, worker_init_fn=_init_worker,
                       **common)
    return (TorchTrainLoader(sampler, loader=train, **kw), _val(cfg, val_split, info, seed, common, kw),
            train_split.classes)


def build_val(cfg, info: RankInfo, *, seed: int, channels_last: bool):
    """(val loader, class names), reading only the val split."""
    split = folder.open_val(cfg)
    return _val(cfg, split, info, seed, *_common(cfg, info, channels_last)), split.classes
