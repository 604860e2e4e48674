"""Random batches created once on the device: the upper bound of throughput with no input cost.

Same interface and epoch length as the real loaders, so a config switches with
`data.loader=synthetic` and nothing else about the run changes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data import RankInfo, folder
from data.sampler import steps_per_epoch


class SyntheticLoader:
    def __init__(self, num_samples: int, batch_size: int, world_size: int, crop: int,
                 num_classes: int, device: torch.device, channels_last: bool, seed: int,
                 steps: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(batch_size, 3, crop, crop, generator=g).to(device)
        if channels_last:
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
        self.num_samples = num_samples
        self.steps_per_epoch = steps if steps is not None else steps_per_epoch(num_samples, batch_size, world_size)
        self.global_batch = batch_size * world_size
        self.start = 0
        self.skipped = 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.start = start_sample // self.global_batch

    def __len__(self) -> int:  # steps left in the epoch from `start_sample`, as the real loaders
        return self.steps_per_epoch - self.start

    def __iter__(self):
        for _ in range(self.start, self.steps_per_epoch):
            yield self.images, self.labels


def build(cfg, info: RankInfo, *, seed: int, channels_last: bool, batch: int | None = None):
    """With a `data.root`, the real dataset's size and classes (the same model, epoch length and
    schedule as the real run: only the pixels differ); without one, ImageNet's."""
    batch = batch or cfg.batch_size  # the train micro-batch (the trainer's split of the global batch)
    if cfg.root and folder.has_split(Path(cfg.root) / "train"):
        split = folder.scan(Path(cfg.root) / "train", cfg.classes)
        classes, num_train = split.classes, len(split)
    else:
        classes = [f"class{i}" for i in range(cfg.num_classes or 1000)]
        num_train = cfg.synthetic_samples
    num_classes = cfg.num_classes or len(classes)
    world, device = info.world_size, info.device
    train = SyntheticLoader(num_train, batch, world, cfg.train_crop, num_classes, device, channels_last,
                            seed + info.rank, steps=steps_per_epoch(num_train, batch, world, cfg.repeated_aug))
    vb = folder.val_batch_size(cfg)
    val = SyntheticLoader(vb * world, vb, world, cfg.val_crop, num_classes, device, channels_last,
                          seed + info.rank, steps=1)
    val.num_samples = vb * world  # one batch per rank: evaluation is timed, not meaningful
    return train, val, classes


def build_val(cfg, info: RankInfo, *, seed: int, channels_last: bool):
    """(val loader, class names): one timed batch per rank, as build's."""
    _, val, classes = build(cfg, info, seed=seed, channels_last=channels_last)
    return val, classes
