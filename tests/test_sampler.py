"""Sharding: same samples whatever the world size, exact resume positions, exact val split."""

import pytest

from data.sampler import GlobalBatchSampler, steps_per_epoch, val_range


def batches(n, batch, rank, world, epoch=0, start=0, seed=0):
    s = GlobalBatchSampler(n, batch, rank, world, seed)
    s.set_epoch(epoch, start)
    keys = list(s)
    return [keys[i:i + batch] for i in range(0, len(keys), batch)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_covers_dataset_once(world):
    n, b = 1001, 8
    seen = [k[0] for r in range(world) for bt in batches(n, b, r, world) for k in bt]
    assert len(seen) == len(set(seen)) == steps_per_epoch(n, b, world) * b * world
    assert n - len(seen) < b * world  # the dropped remainder is smaller than one global batch


def test_two_ranks_read_what_one_rank_reads():
    one = batches(100, 8, 0, 1, epoch=3)
    two = [batches(100, 4, r, 2, epoch=3) for r in range(2)]
    for g, big in enumerate(one):
        assert big == two[0][g] + two[1][g]  # same indices and same augmentation seeds


def test_resume_mid_epoch_on_other_world_size():
    full = [k for r in range(2) for bt in batches(96, 8, r, 2, epoch=1) for k in bt]
    consumed = 2 * 8 * 2  # two global batches of 16
    rest = [k for r in range(4) for bt in batches(96, 4, r, 4, epoch=1, start=consumed) for k in bt]
    first = [k for r in range(2) for bt in batches(96, 8, r, 2, epoch=1)[:2] for k in bt]
    assert sorted(first + rest) == sorted(full)


def test_epochs_differ_and_are_reproducible():
    assert batches(50, 5, 0, 1, epoch=0) == batches(50, 5, 0, 1, epoch=0)
    assert batches(50, 5, 0, 1, epoch=0) != batches(50, 5, 0, 1, epoch=1)


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_val_range_exact(world):
    parts = [val_range(1001, r, world) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(1001))
