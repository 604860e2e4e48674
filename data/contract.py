"""What the trainer may rely on from any loader, as Protocols, and the one error type of `data/`.

The loop never knows which loader it has (torch, dali, synthetic, or a future one), so this is
the whole seam. `tests/test_loader_contract.py` checks every loader against it, by `isinstance`
and by behaviour. Kept free of torch imports so `train/main.py` can name `DataError` cheaply.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


class DataError(ValueError):
    """A mistake in the dataset or the data config (missing class folder, a split smaller than one
    global batch, nothing decodable, DALI not installed): `train/main.py` prints it as one line
    and exits 2, like a config error. `data/` raises it instead of importing `train.config`."""


@runtime_checkable
class RankInfo(Protocol):
    """Where this process sits (train.distributed.DistInfo satisfies it; `data/` never imports train)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


@runtime_checkable
class Loader(Protocol):
    """Iterating yields `(images, labels)` already on `info.device`: images float32 NCHW,
    normalised (optionally channels_last strides), labels int64. `skipped` counts the undecodable
    samples replaced by the next readable one so far; `len()` is the batches the next iteration yields."""

    num_samples: int
    skipped: int

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


@runtime_checkable
class TrainLoader(Loader, Protocol):
    """`num_samples` is the split's size and every rank runs `steps_per_epoch` steps (the
    remainder below one global batch is dropped). `set_epoch(epoch, start_sample)` starts the
    epoch after `start_sample` *global* samples were consumed, so a resume on any world size
    reads the same samples as an uninterrupted run (data/sampler.py)."""

    steps_per_epoch: int

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None: ...


@runtime_checkable
class ValLoader(Loader, Protocol):
    """Yields this rank's disjoint share of the split (the last batch may be partial);
    `num_samples` is the size of the whole split, which evaluation checks its all-reduced count
    against."""
