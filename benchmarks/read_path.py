"""The read path alone: samples/s of fetching encoded bytes (no decode), folder against packed.

    python benchmarks/read_path.py                     # 10,000 ImageNet-sized JPEGs, all CPUs as threads
    python benchmarks/read_path.py --images 50000 --threads 8

Every row reads with the loaders' own code, in the epoch's shuffled global order (data.sampler):
`torch worker` is what one DataLoader worker does per sample before decoding (`Split.read_bytes`
as `folder.first_readable` calls it, one thread per process); `DALI feed` is the DALI
loader's `Feed` (its thread pool of `--threads`, one batch after another, no pipeline); the
`DALI pipeline` rows run a pipeline whose only operator is the external source, fed by that
batch-mode `Feed`, by DALI's parallel external source (`parallel=True`, `--threads` worker
processes, a per-sample callback mapping the sample's position to our planned order), or by one
batch read once and handed over again (`no reading`: what DALI's own intake costs). Cold rows
drop the page cache of every file first (`posix_fadvise(DONTNEED)` per file, no root needed;
the dentry/inode caches stay warm, so a cold folder read here still skips the metadata round
trips that dominate on Lustre/NFS); warm rows read everything once before timing. Rows alternate
between repeats; the median is printed with the ratios packed / folder.

The JPEGs are the other benchmarks' (benchmarks/gpu.py `imagenet_like`: the demo images upscaled
to 500x375, quality 90), packed once with `data.pack` beside them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import imagenet_like  # noqa: E402
from data import folder, pack  # noqa: E402
from data.sampler import GlobalBatchSampler  # noqa: E402

GOAL = 20_000  # samples/s per process: ~3x what one H100 trains ResNet-50 at (~7,000 img/s)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def files_of(split: folder.Split) -> list[str]:
    return list(split.shards) if hasattr(split, "shards") else [p for p, _ in split.samples]


def drop_cache(paths: list[str]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a fresh pack) cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def same_classes(root: Path) -> None:
    """`imagenet_like` takes the first N files of each split, so val can hold a class train lacks
    (and the other way round); make both hold the same class folders, as the loaders require."""
    import shutil

    train = {p.name for p in (root / "train").iterdir()}
    for p in (root / "val").iterdir():
        if p.name not in train:
            shutil.rmtree(p)
    for name in train:
        (root / "val" / name).mkdir(exist_ok=True)


def order(n: int, batch: int) -> np.ndarray:
    """Epoch 0's global order on one rank, whole batches (the trainer's drop-last)."""
    sampler = GlobalBatchSampler(n, batch, 0, 1, seed=0)
    sampler.set_epoch(0)
    return np.array([i for i, _ in sampler], dtype=np.int64)


def torch_worker(split, keys, batch, threads) -> float:
    t0 = time.perf_counter()
    for i in keys:
        split.read_bytes(int(i))
    return len(keys) / (time.perf_counter() - t0)


def plan(keys, batch):
    """The DALI loader's plan: batches of sample indices, endless (here: the epoch twice)."""
    keys = np.tile(keys, 2)
    return ((keys[b:b + batch].tolist(), 0) for b in range(0, len(keys), batch))


def dali_feed(split, keys, batch, threads) -> float:
    from data import dali

    feed = dali.Feed(split, np.arange(len(split)), plan(keys, batch), threads, sized=False)
    steps = len(keys) // batch
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            feed()
        return steps * batch / (time.perf_counter() - t0)
    finally:
        feed.close()


class SampleSource:
    """DALI's parallel external source callback: sample `info.idx_in_epoch` of our planned order."""

    def __init__(self, split, keys):
        self.split, self.keys = split, keys

    def __call__(self, info):
        if info.idx_in_epoch >= len(self.keys):
            raise StopIteration
        i = int(self.keys[info.idx_in_epoch])
        return self.split.read_bytes(i), np.array(self.split.label(i), dtype=np.int64), np.array(i, dtype=np.int64)


class Preread:
    """The ceiling of a batch-mode feed: the bytes of one batch read once and handed over again."""

    def __init__(self, split, keys, batch):
        reads = keys[:batch].tolist()
        self.out = ([split.read_bytes(i) for i in reads], np.array([split.label(i) for i in reads], dtype=np.int64),
                    np.asarray(reads, dtype=np.int64))

    def __call__(self):
        return self.out


def dali_pipeline(split, keys, batch, threads, mode: str) -> float:
    from nvidia.dali import fn, pipeline_def, types

    from data import dali

    dtypes = [types.UINT8, types.INT64, types.INT64]
    feed = None
    if mode == "parallel":
        source, extra = SampleSource(split, keys), dict(batch=False, parallel=True)
        kw = dict(py_num_workers=threads, py_start_method="fork")
    elif mode == "no reading":
        source, extra, kw = Preread(split, keys, batch), dict(batch=True), {}
    else:
        feed = dali.Feed(split, np.arange(len(split)), plan(keys, batch), threads, sized=False)
        source, extra, kw = feed, dict(batch=True), {}

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, prefetch_queue_depth=2, **kw)
    def pipe():
        data, labels, index = fn.external_source(source=source, num_outputs=3, dtype=dtypes, **extra)
        return data, labels, index

    p = pipe()
    p.build()
    steps = len(keys) // batch
    try:
        p.run()  # start-up (worker processes, first prefetch) untimed
        t0 = time.perf_counter()
        for _ in range(steps - 3):
            data, _, _ = p.run()
        return (steps - 3) * batch / (time.perf_counter() - t0)
    finally:
        if feed is not None:
            feed.close()
        del p


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=10000, help="training JPEGs in the upscaled copy")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="DALI feed threads / parallel external source workers (default: all CPUs)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard-size", type=pack.parse_size, default=2**28, help="of the packed copy (default 256MiB)")
    p.add_argument("--demo", default=str(ROOT / "datasets/fashion-mnist"), help="source JPEG folders")
    p.add_argument("--jpegs", default="", help="where the upscaled copy goes (default /tmp/imagenet-like-<images>)")
    p.add_argument("--no-dali", action="store_true", help="skip the DALI rows")
    p.add_argument("--only", default="", help="only the rows whose read path contains this text, e.g. pipeline")
    p.add_argument("--stage", action="store_true", help="also time data.stage_dir copies of both, cold source cache")
    args = p.parse_args()

    t0 = time.perf_counter()
    src = imagenet_like(Path(args.demo), Path(args.jpegs or f"/tmp/imagenet-like-{args.images}"), args.images)
    same_classes(src)
    packed_root = src.with_name(src.name + "-packed")
    pack.pack(src, packed_root, shard_size=args.shard_size)
    print(f"JPEGs: {src}, packed: {packed_root} ({time.perf_counter() - t0:.0f}s to make or find)")
    splits = {"folder": folder.scan(src / "train"), "packed": folder.scan(packed_root / "train")}
    keys = order(len(splits["folder"]), args.batch)
    mean_kb = np.mean([splits["packed"].index[:, 2]]) / 1024
    print(f"CPU: {cpu_model()}; torch {torch.__version__} cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {os.cpu_count()} cores; {args.threads} threads; "
          f"{len(keys)} samples of {mean_kb:.1f} KiB mean, batch {args.batch}", flush=True)

    try:
        import nvidia.dali  # noqa: F401

        has_dali = not args.no_dali
    except ImportError:
        has_dali = False
    readers = {"torch worker (1 thread)": torch_worker}
    if has_dali:
        readers[f"DALI feed ({args.threads} threads)"] = dali_feed
    rows = [(reader, kind, cache) for reader in readers for cache in ("cold", "warm") for kind in splits]
    if has_dali:
        for mode in ("batch Feed", "parallel", "no reading"):
            rows += [(f"DALI pipeline, {mode}", kind, "warm") for kind in splits]
    rows = [row for row in rows if args.only in row[0]]
    rates: dict[tuple, list[float]] = {row: [] for row in rows}
    for r in range(args.repeats):
        for row in rows if r % 2 == 0 else rows[::-1]:
            reader, kind, cache = row
            split = splits[kind]
            if cache == "cold":
                drop_cache(files_of(split))
            else:
                torch_worker(split, keys, args.batch, 1)  # into the page cache
            if reader.startswith("DALI pipeline"):
                rate = dali_pipeline(split, keys, args.batch, args.threads, mode=reader.split(", ")[1])
            else:
                rate = readers[reader](split, keys, args.batch, args.threads)
            rates[row].append(rate)
            print(f"repeat {r + 1}/{args.repeats}  {reader:<28} {kind:<6} {cache}  {rate:10.0f} samples/s", flush=True)

    print(f"\n{'read path':<30} {'cache':<5} {'folder':>10} {'packed':>10}  packed/folder  (samples/s, median of "
          f"{args.repeats})")
    for reader, cache in dict.fromkeys((r, c) for r, _, c in rows):
        f, pk = (statistics.median(rates[(reader, kind, cache)]) for kind in ("folder", "packed"))
        goal = f"  goal {GOAL:,}/process: {'met' if pk >= GOAL else 'NOT met'}"
        print(f"{reader:<30} {cache:<5} {f:10.0f} {pk:10.0f}  {pk / f:6.2f}x{goal}")
    if args.stage:
        stage_times(src, packed_root, args.repeats)
    print(f"load average {os.getloadavg()[0]:.1f} (other work on the machine lowers every row)")


def stage_times(src: Path, packed_root: Path, repeats: int) -> None:
    """Seconds of `data.stage.stage` (copy + checks) for the folder and the packed copy."""
    import shutil
    import tempfile

    from data import stage

    roots, secs = {"folder": src, "packed": packed_root}, {"folder": [], "packed": []}
    for r in range(repeats):
        for kind in ("folder", "packed") if r % 2 == 0 else ("packed", "folder"):
            drop_cache([str(p) for p in roots[kind].rglob("*") if p.is_file()])
            with tempfile.TemporaryDirectory(dir=src.parent) as tmp:  # same disk as the data
                t0 = time.perf_counter()
                s = stage.stage(roots[kind], tmp)
                secs[kind].append(time.perf_counter() - t0)
                files, size = len(stage.manifest(roots[kind]).files), s.bytes
                shutil.rmtree(s.path)
            print(f"stage {kind:<6} {files:6d} files {size / 2**20:7.1f} MiB  {secs[kind][-1]:6.2f} s", flush=True)
    f, pk = (statistics.median(secs[k]) for k in ("folder", "packed"))
    print(f"staging (copy + checks, cold source): folder {f:.2f} s, packed {pk:.2f} s: packed {f / pk:.1f}x faster")


if __name__ == "__main__":
    main()
