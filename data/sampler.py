"""Which sample indices each rank reads: one global shuffled order, cut into global batches.

torch's DistributedSampler cannot start an epoch in the middle and ties the order to the world
size. Here the order of an epoch is a permutation of the whole dataset seeded by (seed, epoch);
global batch g is `order[g*B*W : (g+1)*B*W]` and rank r reads its r-th slice of B. A position is
a count of *global* samples, so a run stopped after k samples resumes at sample k on any number
of ranks, and 1 rank with batch 2B reads exactly the samples 2 ranks with batch B read.

Repeated augmentation (`data.repeated_aug: k > 1`, Hoffer et al. 2019; DeiT's and torchvision's
`RASampler`): the global sequence of an epoch is the order with every index written k times in a
row, `order[p // k]` at global position p, copy number `p % k` (part of the augmentation seed, so
the copies are augmented differently), and position p goes to rank `p % W` (RASampler's
`indices[rank::W]`), so the k copies of an index sit on k different ranks whenever W >= k. The
epoch is as long as RASampler's, `floor(n // 256 * 256 / W)` samples per rank, cut to whole
batches: about n samples, hence about n / k distinct images an epoch, each k times. Positions are
still global, so resume at any global sample and any world size work as without it.
"""

from __future__ import annotations

import os

import torch

from data import DataError


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_samples)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_samples, generator=g)


REPEAT_STRIDE = 1_000_000_000_039  # > epoch * 10_007_951 + index of any real run: copies never share seeds


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """Augmentation seed of one sample (copy `repeat` under repeated augmentation) in one epoch:
    independent of ranks, workers and resumes."""
    return (seed * 1_000_003 + epoch * 10_007_951 + index + repeat * REPEAT_STRIDE) % 2**63


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, repeats: int = 1) -> int:
    """Every rank runs the same number of steps (DDP would hang otherwise); the remainder is
    smaller than one global batch and is dropped, as DLE and torchvision's references do. With
    `repeats` > 1, torchvision's RASampler epoch: `num_samples // 256 * 256 // world_size` per rank."""
    if repeats > 1:
        return num_samples // 256 * 256 // world_size // batch_size
    return num_samples // (batch_size * world_size)


class GlobalBatchSampler:
    """Yields this rank's (index, augmentation seed) pairs for one epoch, one per sample."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int,
                 seed: int, shuffle: bool = True, repeats: int = 1):
        self.n, self.batch, self.rank, self.world = num_samples, batch_size, rank, world_size
        self.seed, self.shuffle, self.repeats = seed, shuffle, repeats
        self.epoch, self.start = 0, 0
        if self.steps_per_epoch == 0:
            ra = f" (data.repeated_aug: an epoch of {num_samples // 256 * 256}, RASampler's)" if repeats > 1 else ""
            raise DataError(f"dataset of {num_samples} samples{ra} is smaller than one global batch "
                            f"({batch_size} x {world_size} ranks)")

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.n, self.batch, self.world, self.repeats)

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Start `epoch` after `start_sample` global samples were already consumed."""
        self.epoch, self.start = epoch, start_sample

    @property
    def global_batch(self) -> int:
        return self.batch * self.world

    def __len__(self) -> int:  # samples this rank reads from `start` to the end of the epoch
        end = self.steps_per_epoch * self.global_batch
        return max(0, (end - self.start) // self.global_batch) * self.batch

    def __iter__(self):
        if self.repeats > 1:
            yield from self._iter_repeated()
            return
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle).tolist()
        gb = self.global_batch
        trace = os.environ.get("RESNET_SAMPLE_TRACE")  # debug (tests/test_elastic.py): a folder
        for g in range(len(self) // self.batch):
            lo = self.start + g * gb + self.rank * self.batch
            if trace:  # "epoch world_size global_position index...", one line per batch, a file per process
                with open(os.path.join(trace, f"rank{self.rank}-pid{os.getpid()}.txt"), "a") as f:
                    f.write(f"{self.epoch} {self.world} {lo} {' '.join(map(str, order[lo:lo + self.batch]))}\n")
            for i in order[lo:lo + self.batch]:
                yield i, sample_seed(self.seed, self.epoch, i)

    def _iter_repeated(self):
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        k, w, gb = self.repeats, self.world, self.global_batch
        for g in range(len(self) // self.batch):
            pos = self.start + g * gb + self.rank + w * torch.arange(self.batch)
            for i, rep in zip(order[pos // k].tolist(), (pos % k).tolist()):
                yield i, sample_seed(self.seed, self.epoch, i, rep)


def val_range(num_samples: int, rank: int, world_size: int) -> range:
    """Contiguous, disjoint share of the validation set: every image counted exactly once."""
    return range(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)


def train_crop_at(cfg, epoch: int) -> int:
    """Training resolution of `epoch` under progressive resizing (FFCV's rule: linear between
    the start and end epochs, rounded to a multiple of 32); `cfg.train_crop` when it is off."""
    lo, hi = cfg.progressive_min_crop, cfg.train_crop
    if not lo:
        return hi
    start, end = cfg.progressive_start_epoch, cfg.progressive_end_epoch
    if epoch <= start:
        return lo
    if epoch >= end:
        return hi
    res = lo + (hi - lo) * (epoch - start) / (end - start)
    return min(hi, max(lo, int(round(res / 32)) * 32))
