"""Data loaders behind one seam: every loader yields `(images, labels)` already on the device.

The seam is spelled out here as Protocols (`TrainLoader`, `ValLoader`, `RankInfo`) with the one
error type of `data/`, `DataError`: the loop never knows which loader it has (torch, dali,
synthetic, or a future one), and `tests/test_loader_contract.py` checks every loader against
them, by `isinstance` and by behaviour. This module imports no torch, so `train/main.py` can name
`DataError` cheaply. What the folder-reading loaders share (scanning a split, sharding, the
bad-file replacement rule, normalisation constants) is in `data/folder.py`, so a new storage
format or loader plugs into both: `data/packed.py` (tar shards written by `data/pack.py`) is one.
`data/stage.py` copies a dataset to node-local disk first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

__all__ = ["DataError", "Loader", "RankInfo", "TrainLoader", "ValLoader", "build_loaders", "build_val_loader"]


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


def _impl(cfg, info: RankInfo):
    """(module, cfg) for `cfg.loader`; with `cfg.stage_dir`, cfg reads a node-local copy of `cfg.root`."""
    if cfg.stage_dir and cfg.loader != "synthetic":
        from data import stage

        cfg = stage.staged(cfg, info)
    if cfg.loader == "synthetic":
        from data import synthetic as impl
    elif cfg.loader == "dali":
        from data import dali as impl
    else:
        from data import torch_loader as impl
    return impl, cfg


def build_loaders(cfg, info: RankInfo, *, seed: int, channels_last: bool, batch: int | None = None
                  ) -> tuple[TrainLoader, ValLoader, list[str]]:
    """(train, val, class names) for `cfg.loader` in torch | dali | synthetic, sharded for `info.rank`;
    with `cfg.stage_dir`, read from a node-local copy of `cfg.root` (data/stage.py). `batch`: the
    train micro-batch per rank (default `data.batch_size`), which the trainer derives from `data.global_batch` or
    `data.batch_size` (train/config.py `split_batch`)."""
    impl, cfg = _impl(cfg, info)
    return impl.build(cfg, info, batch=batch, seed=seed, channels_last=channels_last)


def build_val_loader(cfg, info: RankInfo, *, seed: int, channels_last: bool) -> tuple[ValLoader, list[str]]:
    """(val, class names) without touching the train split: `python -m train.evaluate` builds one per
    val size, and scanning (and, for DALI, preflighting) ImageNet's 1.28 M train files each time
    would cost minutes."""
    impl, cfg = _impl(cfg, info)
    return impl.build_val(cfg, info, seed=seed, channels_last=channels_last)
