"""Data loaders behind one seam: every loader yields `(images, labels)` already on the device.

The contract is spelled out in `data/contract.py` (TrainLoader, ValLoader, RankInfo, DataError);
what the folder-reading loaders share (scanning a split, sharding, the bad-file replacement
rule, normalisation constants) is in `data/folder.py`, so a new storage format or loader plugs
into both: `data/packed.py` (tar shards written by `data/pack.py`) is one. `data/stage.py` copies
a dataset to node-local disk first.
"""

from __future__ import annotations

from data.contract import DataError, Loader, RankInfo, TrainLoader, ValLoader

__all__ = ["DataError", "Loader", "RankInfo", "TrainLoader", "ValLoader", "build_loaders", "build_val_loader"]


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
    `data.batch_size` (train/recipe.py `split_batch`)."""
    impl, cfg = _impl(cfg, info)
    return impl.build(cfg, info, batch=batch, seed=seed, channels_last=channels_last)


def build_val_loader(cfg, info: RankInfo, *, seed: int, channels_last: bool) -> tuple[ValLoader, list[str]]:
    """(val, class names) without touching the train split: `python -m train.evaluate` builds one per
    val size, and scanning (and, for DALI, preflighting) ImageNet's 1.28 M train files each time
    would cost minutes."""
    impl, cfg = _impl(cfg, info)
    return impl.build_val(cfg, info, seed=seed, channels_last=channels_last)
