"""MixUp / CutMix (data/mix.py): torchvision v2's maths given the same draws; draws from the position."""

from __future__ import annotations

import types

import torch
from torchvision.transforms import v2

from data.mix import Mixer, MixLoader, cutmix, cutmix_box, mixup

C = 5


def batch(n=6, size=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, C, (n,), generator=g)


def fixed(lam):
    return types.SimpleNamespace(sample=lambda shape=(): torch.tensor(lam))


def test_mixup_equals_v2_mixup():
    images, labels = batch()
    t = v2.MixUp(num_classes=C)
    t._dist = fixed(0.3)
    want_x, want_y = t(images.clone(), labels.clone())
    got_x, got_y = mixup(images.clone(), torch.nn.functional.one_hot(labels, C).float(), 0.3)
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_y, want_y)


def test_cutmix_equals_v2_cutmix():
    images, labels = batch(size=10)
    t = v2.CutMix(num_classes=C)
    t._dist = fixed(0.6)
    torch.manual_seed(3)  # v2 draws the box centre from the global RNG: r_x, then r_y
    want_x, want_y = t(images.clone(), labels.clone())
    torch.manual_seed(3)
    cx, cy = int(torch.randint(10, (1,))), int(torch.randint(10, (1,)))
    got_x, got_y = cutmix(images.clone(), torch.nn.functional.one_hot(labels, C).float(),
                          cutmix_box(0.6, 10, 10, cy, cx))
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_y, want_y)


class Fake:
    def __init__(self, batches):
        self.batches, self.start, self.steps_per_epoch = batches, 0, len(batches)

    def set_epoch(self, epoch, start_sample=0):
        self.start = start_sample // 12  # 6 per rank x 2 ranks

    def __iter__(self):
        return iter(self.batches[self.start:])


def test_draws_follow_the_position_so_resume_mixes_alike():
    batches = [batch() for _ in range(4)]
    mixer = Mixer(C, mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.9, seed=1)
    loader = MixLoader(Fake(batches), mixer, world_size=2, rank=0)
    loader.set_epoch(0, 0)
    full = list(loader)
    loader.set_epoch(0, 24)  # resumed after two global batches of 12
    rest = list(loader)
    assert loader.steps_per_epoch == 4
    for (x0, y0), (x1, y1) in zip(full[2:], rest):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    for _, y in full:
        assert y.shape == (6, C) and y.dtype == torch.float32
        torch.testing.assert_close(y.sum(1), torch.ones(6))
    assert any(y.max() < 1 for _, y in full)  # something was mixed
    other = MixLoader(Fake(batches), mixer, world_size=2, rank=1)
    other.set_epoch(0, 0)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(full, other))  # ranks draw apart
