"""MixUp and CutMix on the device after the loader, so they work with every loader.

`wrap(loader, cfg, ...)` returns the train loader itself when `data.mixup_alpha` and
`data.cutmix_alpha` are 0, else a `MixLoader` that yields `(images, soft targets [N, C] float32)`.
The maths are torchvision.transforms.v2's `MixUp` and `CutMix` (pair each image with the previous
one in the batch, `roll(1, 0)`; CutMix's box from a uniform centre and half-sides
`0.5 * sqrt(1 - lam) * (W, H)`, clipped, and lam re-computed from the pasted area), chosen per
batch as timm's `Mixup` does: with probability `mix_prob` the batch is mixed, with both alphas > 0
CutMix with probability `mix_switch_prob`, else MixUp. tests/test_mix.py checks the output against
v2.MixUp / v2.CutMix given the same draws.

Not v2's classes themselves: they draw from the global torch RNG. Here every draw (whether to mix,
which op, lam, the box centre) comes from an explicit `numpy.random.Generator` seeded from
(train.seed, epoch, global batch index, rank), the batch's position in the global sample order, so
an interrupted and resumed run mixes every batch exactly as the uninterrupted one. The draws are
host scalars: no device sync. Targets are unsmoothed (label smoothing is the loss's,
train/optim.py); validation is never mixed (only the train loader is wrapped).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def mixup(images: torch.Tensor, targets: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """v2.MixUp's maths for a given lam: x lam + roll(x, 1) (1 - lam), likewise the targets."""
    return (images.roll(1, 0).mul_(1.0 - lam).add_(images.mul(lam)),
            targets.roll(1, 0).mul_(1.0 - lam).add_(targets.mul(lam)))


def cutmix_box(lam: float, height: int, width: int, cy: int, cx: int) -> tuple[int, int, int, int]:
    """v2.CutMix's box (x1, y1, x2, y2) around the centre (cy, cx) for the mixing weight lam."""
    r = 0.5 * math.sqrt(1.0 - lam)
    rw, rh = int(r * width), int(r * height)
    return max(cx - rw, 0), max(cy - rh, 0), min(cx + rw, width), min(cy + rh, height)


def cutmix(images: torch.Tensor, targets: torch.Tensor, box: tuple[int, int, int, int]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """v2.CutMix's maths for a given box: paste roll(x, 1)'s box in; lam = the area left."""
    x1, y1, x2, y2 = box
    h, w = images.shape[-2:]
    out = images.clone()
    out[..., y1:y2, x1:x2] = images.roll(1, 0)[..., y1:y2, x1:x2]
    lam = 1.0 - (x2 - x1) * (y2 - y1) / (w * h)
    return out, targets.roll(1, 0).mul_(1.0 - lam).add_(targets.mul(lam))


class Mixer:
    """One batch's draws from its position, then MixUp or CutMix (or neither)."""

    def __init__(self, num_classes: int, *, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
                 switch_prob: float = 0.5, seed: int = 0):
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.seed = prob, switch_prob, seed

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *, epoch: int, batch: int, rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, epoch, batch, rank])
        # one_hot's values by scatter: F.one_hot reads the labels' min back to the host off CUDA
        targets = images.new_zeros(labels.shape[0], self.num_classes, dtype=torch.float32)
        targets.scatter_(1, labels.long()[:, None], 1.0)
        apply, switch = rng.random(2)
        if apply >= self.prob:
            return images, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or switch < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return mixup(images, targets, lam)
        h, w = images.shape[-2:]
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        return cutmix(images, targets, cutmix_box(lam, h, w, cy, cx))


class MixLoader:
    """The train loader with its batches mixed; everything else is the wrapped loader's."""

    def __init__(self, loader, mixer: Mixer, *, world_size: int, rank: int):
        self.loader, self.mixer = loader, mixer
        self.world_size, self.rank = world_size, rank
        self.epoch, self.start_sample = 0, 0

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.epoch, self.start_sample = epoch, start_sample
        self.loader.set_epoch(epoch, start_sample)

    def __iter__(self):
        first = 0
        for i, (images, labels) in enumerate(self.loader):
            if i == 0:  # the global batch index (equal batches on all ranks): the same after a resume
                first = self.start_sample // (images.shape[0] * self.world_size)
            yield self.mixer(images, labels, epoch=self.epoch, batch=first + i, rank=self.rank)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # steps_per_epoch, skipped, num_samples, ...
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def wrap(loader, cfg, *, num_classes: int, seed: int, world_size: int, rank: int):
    """`loader` itself if MixUp and CutMix are off (`cfg`: the data config section)."""
    if not (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0):
        return loader
    mixer = Mixer(num_classes, mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mix_prob,
                  switch_prob=cfg.mix_switch_prob, seed=seed)
    return MixLoader(loader, mixer, world_size=world_size, rank=rank)
