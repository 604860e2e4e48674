"""A dataset split as the loaders see it, and the decisions every loader must make alike.

A `Split` is a list of samples (a name and a label each), the class names, and a way to read
the encoded bytes of sample i. `FolderSplit` is the ImageNet folder layout; the torch and DALI
loaders read only through a Split, so another storage format is one more subclass, not one more
loader: `data.packed.PackedSplit` (tar shards read with os.pread) is the other one.

The helpers are what both loaders must do identically for a run to switch loaders and still
resume exactly: which samples each rank reads (data/sampler.py) and its validation share and
batch, what stands in for an undecodable sample, and the normalisation constants.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from data import DataError, RankInfo, preflight
from data.sampler import GlobalBatchSampler

log = logging.getLogger("resnet")
T = TypeVar("T")

MAX_UNREADABLE_RUN = 100  # consecutive undecodable samples before the torch loader gives up


class Split:
    """`samples[i]` is (name, label): the name is what messages show (the path, for folders) and
    `classes[label]` the class name. Subclasses say how bytes are read and which samples are
    unusable; everything else about a split is format-independent."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]):
        self.samples, self.classes = samples, classes

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, i: int) -> str:
        return self.samples[i][0]

    def label(self, i: int) -> int:
        return self.samples[i][1]

    def read_bytes(self, i: int) -> np.ndarray:
        """The encoded image of sample i as a 1-D uint8 array; writable, so torch.from_numpy and
        DALI's external_source take it without a copy."""
        raise NotImplementedError

    def find_unusable(self, workers: int) -> set[int]:
        """Indices that cannot be decoded, known before an epoch starts (DALI must plan around
        them: its decoder raises mid-pipeline where the torch loader could catch it)."""
        raise NotImplementedError


class FolderSplit(Split):
    """`<root>/<class>/<image>` (torchvision's ImageFolder layout and order)."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], classes: list[str]):
        super().__init__(samples, classes)
        self.root = Path(root)

    def read_bytes(self, i: int) -> np.ndarray:
        return np.fromfile(self.samples[i][0], dtype=np.uint8)

    def find_unusable(self, workers: int) -> set[int]:
        report = preflight.cached_check([p for p, _ in self.samples], workers)
        if report.unusable:
            log.warning("%s: %d unusable images (zero-byte %d, truncated %d, non-image %d) are replaced by the "
                        "next readable one; list them with `python -m data.preflight %s`", self.root,
                        len(report.unusable), len(report.zero_byte), len(report.truncated), len(report.non_image),
                        self.root)
        return {i for i, (path, _) in enumerate(self.samples) if path in report.unusable}


def is_packed(root: Path) -> bool:
    """`root` holds a dataset written by `python -m data.pack` (data/packed.py)."""
    return (Path(root) / "index.json").is_file()


def has_split(path: Path) -> bool:
    """`<root>/<split>` exists, as a folder or as a split of a packed `<root>`."""
    path = Path(path)
    return path.is_dir() or is_packed(path.parent)


def scan(root: Path, only: list[str] | tuple[str, ...] = ()) -> Split:
    """An ImageNet-style split, classes sorted by folder name; `only` keeps a subset of class
    folders (labels renumbered 0..k-1), e.g. for transfer learning. `root` may also name a split
    of a packed dataset, `<packed root>/<split>`: the same samples in the same order."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not Path(root).is_dir() and is_packed(Path(root).parent):
        from data import packed

        return packed.open_split(Path(root).parent, Path(root).name, only)
    classes, _ = find_classes(str(root))
    if only:
        missing = sorted(set(only) - set(classes))
        if missing:
            raise DataError(f"data.classes: {missing[:3]} not found in {root}")
        classes = sorted(only)
    samples = make_dataset(str(root), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    return FolderSplit(root, samples, classes)


def open_splits(cfg) -> tuple[Split, Split]:
    """`cfg.root`'s train and val splits, folders or packed; a model trained on one must be scored
    on the same classes."""
    root = Path(cfg.root)
    train, val = scan(root / "train", cfg.classes), scan(root / "val", cfg.classes)
    if val.classes != train.classes:
        raise DataError(f"data.root: classes of {root / 'val'} differ from {root / 'train'}")
    return train, val


def open_val(cfg) -> Split:
    """`cfg.root`'s val split alone (for evaluation): training has already checked that its classes
    are the train split's."""
    return scan(Path(cfg.root) / "val", cfg.classes)


def train_sampler(cfg, train: Split, info: RankInfo, seed: int, batch: int) -> GlobalBatchSampler:
    """This rank's part of the one global training order (its validation share is
    `data.sampler.val_range`: disjoint and contiguous, every image counted exactly once)."""
    return GlobalBatchSampler(len(train), batch, info.rank, info.world_size, seed, repeats=cfg.repeated_aug)


def val_batch_size(cfg) -> int:
    return cfg.val_batch_size or cfg.batch_size


def normalisation(cfg) -> tuple[list[float], list[float]]:
    """(mean, std) on the 0..255 scale, rounded to float32 once here so every loader subtracts
    and divides by bitwise the same numbers."""
    return [(np.asarray(v, dtype=np.float32) * np.float32(255)).tolist() for v in (cfg.mean, cfg.std)]


def first_readable(split: Split, index: int, decode: Callable[[np.ndarray], T]) -> tuple[T, int]:
    """The replacement rule, applied on the fly: sample `index` if it decodes, else the next one
    that does (cyclically), so a corrupt image costs one sample instead of the run. Returns the
    decoded image and the index actually read (whose label goes with it)."""
    for attempt in range(min(len(split), MAX_UNREADABLE_RUN)):
        i = (index + attempt) % len(split)
        try:
            return decode(split.read_bytes(i)), i
        except Exception as e:  # noqa: BLE001 - any read or decode failure means "skip this sample"
            log.warning("skipping unreadable image %s: %s", split.name(i), (str(e).splitlines() or [repr(e)])[0])
    raise RuntimeError(f"{MAX_UNREADABLE_RUN} consecutive unreadable images starting at {split.name(index)}")


def replacements(num_samples: int, unusable: set[int]) -> np.ndarray:
    """The same rule, planned ahead from a list of unusable indices: the index read in place of
    each sample, itself or the next usable one (cyclically)."""
    good = np.array([i not in unusable for i in range(num_samples)], dtype=bool)
    if not good.any():
        raise DataError(f"data.root: none of the {num_samples} images can be decoded")
    subst, nxt = np.empty(num_samples, dtype=np.int64), None
    for i in (*range(num_samples - 1, -1, -1), *range(num_samples - 1, -1, -1)):  # twice: wrap around the end
        if good[i]:
            nxt = i
        subst[i] = nxt if nxt is not None else -1
    return subst
