"""Data loaders behind one seam: every loader yields `(images, labels)` already on the device.

A train loader has `steps_per_epoch`, `num_samples`, `skipped` (undecodable files replaced so
far) and `set_epoch(epoch, start_sample)`, where `start_sample` counts *global* samples already
consumed in that epoch (mid-epoch resume on any world size). A val loader yields this rank's
disjoint share and has `num_samples`, the size of the whole split, which the evaluation checks
its all-reduced count against.
"""

from __future__ import annotations

import torch


def build_loaders(cfg, rank: int, world_size: int, device: torch.device, seed: int, channels_last: bool):
    """(train, val, class names) for `cfg.loader` in torch | dali | synthetic."""
    if cfg.loader == "synthetic":
        from data import synthetic as impl
    elif cfg.loader == "dali":
        from data import dali as impl
    else:
        from data import torch_loader as impl
    return impl.build(cfg, rank, world_size, device, seed, channels_last)
