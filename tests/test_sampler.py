"""Sharding: same samples whatever the world size, exact resume positions, exact val split."""

import collections
import math

import pytest

from data import DataError
from data.sampler import GlobalBatchSampler, epoch_order, sample_seed, steps_per_epoch, val_range


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


# --- repeated augmentation (data.repeated_aug) ---------------------------------------------------

def ra_batches(n, batch, rank, world, k, epoch=0, start=0, seed=0):
    s = GlobalBatchSampler(n, batch, rank, world, seed, repeats=k)
    s.set_epoch(epoch, start)
    keys = list(s)
    assert len(keys) == len(s)
    return [keys[i:i + batch] for i in range(0, len(keys), batch)]


def rasampler_reference(order: list[int], k: int, rank: int, world: int) -> list[int]:
    """What torchvision's references/classification/sampler.py RASampler yields on `rank` for a
    given epoch order: every index k times in a row, every world-th of those from `rank` on, the
    first floor(n // 256 * 256 / world) of them (its padding to a multiple of world is never reached)."""
    repeated = [i for i in order for _ in range(k)]
    return repeated[rank::world][:math.floor(len(order) // 256 * 256 / world)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("k", [2, 3])
def test_repeated_aug_each_index_k_times_on_different_ranks(world, k):
    n, b = 1001, 8
    where = collections.defaultdict(list)  # index -> ranks of its copies
    seeds = set()
    for r in range(world):
        for bt in ra_batches(n, b, r, world, k, epoch=2):
            for i, seed in bt:
                where[i].append(r)
                seeds.add(seed)
    total = sum(map(len, where.values()))
    assert total == steps_per_epoch(n, b, world, repeats=k) * b * world == len(seeds)  # every copy its own seed
    short = [i for i, ranks in where.items() if len(ranks) != k]
    assert len(short) == (total % k != 0)  # only the index the epoch end cuts through has fewer copies
    assert all(len(where[i]) < k for i in short)
    if world >= k:
        assert all(len(set(ranks)) == len(ranks) for ranks in where.values())


@pytest.mark.parametrize("n, world, k, batch", [(1001, 1, 2, 8), (1001, 2, 3, 8), (1001, 3, 4, 8), (5000, 4, 3, 16),
                                                 (60000, 2, 4, 64), (1281167, 8, 4, 128)])
def test_repeated_aug_epoch_matches_torchvision_rasampler(n, world, k, batch):
    per_rank = math.floor(n // 256 * 256 / world)  # RASampler's num_selected_samples (its __len__)
    s = GlobalBatchSampler(n, batch, 0, world, seed=0, repeats=k)
    assert len(s) == per_rank // batch * batch  # its partial last batch dropped, as every loader here does
    assert s.steps_per_epoch == steps_per_epoch(n, batch, world, repeats=k) == per_rank // batch
    if n > 100_000:
        return
    order = epoch_order(n, 0, 1).tolist()
    for r in range(world):
        got = [i for bt in ra_batches(n, batch, r, world, k, epoch=1) for i, _ in bt]
        assert got == rasampler_reference(order, k, r, world)[:len(got)]  # the same samples on the same rank


def test_repeated_aug_resume_mid_epoch_and_world_size():
    n, k = 1200, 3
    full = [ra_batches(n, 4, r, 2, k, epoch=1) for r in range(2)]  # global batch 8
    for start in (8, 40):
        tails = [ra_batches(n, 4, r, 2, k, epoch=1, start=start) for r in range(2)]
        assert tails == [f[start // 8:] for f in full]
    # the same global batches, as sets, on 1 rank of batch 8 and 4 ranks of batch 2, resumed at 16
    one = ra_batches(n, 8, 0, 1, k, epoch=1, start=16)
    four = [ra_batches(n, 2, r, 4, k, epoch=1, start=16) for r in range(4)]
    assert len(one) == len(full[0]) - 2 == len(four[0])
    for g, big in enumerate(one):
        assert sorted(big) == sorted(sum((four[r][g] for r in range(4)), []))
        assert sorted(big) == sorted(full[0][g + 2] + full[1][g + 2])


def test_repeated_aug_seeds_differ_per_copy_and_epoch_one_is_unchanged():
    assert sample_seed(0, 3, 17) == sample_seed(0, 3, 17, repeat=0)
    assert len({sample_seed(5, e, i, rep) for e in range(3) for i in range(1000) for rep in range(4)}) == 12_000
    assert batches(100, 8, 0, 1, epoch=3) == ra_batches(100, 8, 0, 1, 1, epoch=3)  # k=1: the plain sampler


def test_repeated_aug_dataset_too_small():
    with pytest.raises(DataError, match="repeated_aug: an epoch of 0"):
        GlobalBatchSampler(255, 1, 0, 1, 0, repeats=2)
