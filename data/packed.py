"""A packed dataset (written by `python -m data.pack`): each split in a few uncompressed tar shards
plus an index, read by sample index with `os.pread`.

On a shared filesystem the folder layout costs one open and one metadata lookup per sample and
epoch (1.3 M per node for ImageNet); a packed split costs one open per shard and process, and
each sample is a single positioned read. The shards are plain WebDataset tars (`tar tf` lists
them, `<key>.jpg` + `<key>.cls` per sample; DALI's `readers.webdataset` and webdataset's `wids`
read them); random access comes from our own index, so the loaders keep their global order,
mid-epoch resume and exact validation unchanged:

    <root>/index.json            format, classes, per split: counts, shard list; every file's size
                                 and sha256 (staging verifies copies against them)
    <root>/<split>-000000.tar    the shards
    <root>/<split>.index.npy     int64 (N, 4): shard, byte offset of the data, size, label
    <root>/<split>.names.txt     each sample's path in the source split (messages only)
    <root>/<split>.wids.json     the shard list in webdataset's `wids` format
    <root>/report.json           the pack-time preflight: files left out, and warnings

`PackedSplit` is a `data.folder.Split`, so the loaders do not know which kind they read.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from data import DataError
from data.folder import Split

INDEX = "index.json"  # its presence is what makes a root packed (data.folder.is_packed)
FORMAT = "resnet-train-packed-v1"
SHARD, OFFSET, SIZE, LABEL = range(4)  # columns of <split>.index.npy


def read_index(root: str | Path) -> dict:
    meta = json.loads((Path(root) / INDEX).read_text())
    if meta.get("format") != FORMAT:
        raise DataError(f"data.root: {Path(root) / INDEX} is not a {FORMAT} index (format {meta.get('format')!r})")
    return meta


def load_rows(path: Path) -> np.ndarray:
    """The (N, 4) index, memory-mapped (one copy in the page cache for all processes) and viewed
    as a plain ndarray: indexing a np.memmap row costs ~17 us, a plain one under 1 us."""
    return np.load(path, mmap_mode="r").view(np.ndarray)


class PackedSplit(Split):
    """One split of a packed dataset. Shard descriptors are opened lazily, per process: forked
    DataLoader workers and DALI's reader threads each pread through their own process's fds,
    and a pickled split (spawned workers) travels without them."""

    def __init__(self, root: Path, split: str, meta: dict, only: list[str] | tuple[str, ...] = ()):
        self.root, self.split = Path(root), split
        info = meta["splits"][split]
        self.shards = [str(self.root / s["file"]) for s in info["shards"]]
        index = load_rows(self.root / info["index"])
        classes = list(meta["classes"])
        if only:  # a subset of classes, renumbered 0..k-1 in sorted order (as data.folder.scan)
            missing = sorted(set(only) - set(classes))
            if missing:
                raise DataError(f"data.classes: {missing[:3]} not found in {self.root}")
            keep = sorted(only)
            new_label = np.full(len(classes), -1, dtype=np.int64)
            new_label[[classes.index(c) for c in keep]] = np.arange(len(keep))
            self.rows = np.flatnonzero(new_label[index[:, LABEL]] >= 0)
            index = np.array(index[self.rows])
            index[:, LABEL] = new_label[index[:, LABEL]]
            classes = keep
        else:
            self.rows = None
        self.index, self.classes = index, classes
        self._names_file = self.root / info["names"]
        self._names: list[str] | None = None
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    def label(self, i: int) -> int:
        return int(self.index[i, LABEL])

    def name(self, i: int) -> str:
        """`<shard>:<path in the source split>`, for messages."""
        if self._names is None:
            names = self._names_file.read_text().splitlines()
            self._names = names if self.rows is None else [names[r] for r in self.rows]
        return f"{self.shards[self.index[i, SHARD]]}:{self._names[i]}"

    @property
    def samples(self) -> list[tuple[str, int]]:
        """(name, label) pairs like a folder split's (tests, debugging; the loaders do not use it)."""
        return [(self.name(i), self.label(i)) for i in range(len(self))]

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked child: drop the inherited copies, open its own
            for inherited in self._fds.values():
                os.close(inherited)
            self._fds, self._pid, self._lock = {}, os.getpid(), threading.Lock()
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return fd

    def read_bytes(self, i: int) -> np.ndarray:
        shard, offset, size, _ = self.index[i].tolist()
        data = np.empty(size, dtype=np.uint8)
        got = os.preadv(self._fd(shard), [data], offset)  # straight into the array: no bytes copy
        if got != size:
            raise OSError(f"{self.name(i)}: read {got} of {size} bytes at offset {offset} (shard truncated?)")
        return data

    def find_unusable(self, workers: int) -> set[int]:
        """None known: `data.pack` decoded every file and left the unusable ones out (listed in
        report.json). A sample that fails to decode anyway is still replaced on the fly by the
        torch loader (`folder.first_readable`)."""
        return set()

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__, _fds={}, _lock=None, _pid=None)
        if self.rows is None:
            state["index"] = None  # re-mapped from the file on arrival
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._pid = threading.Lock(), os.getpid()
        if self.index is None:
            meta = read_index(self.root)
            self.index = load_rows(self.root / meta["splits"][self.split]["index"])

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def open_split(root: str | Path, split: str, only: list[str] | tuple[str, ...] = ()) -> PackedSplit:
    meta = read_index(root)
    if split not in meta["splits"]:
        raise DataError(f"data.root: the packed dataset {root} has no '{split}' split ({sorted(meta['splits'])})")
    return PackedSplit(Path(root), split, meta, only)
