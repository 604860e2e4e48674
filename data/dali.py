"""ImageNet-folder loader on NVIDIA DALI: JPEG decoding (nvJPEG plus the A100/H100 hardware
decoder) and augmentation on the GPU, or on DALI's CPU threads when there is no CUDA.

Which files a rank reads is decided in Python and fed through `fn.external_source`, not by
`fn.readers.file`: the reader shards by contiguous file ranges and shuffles with its own buffer,
so it can neither reproduce the global order of `data.sampler` (same samples on any world size)
nor start an epoch at an arbitrary global sample. Here `GlobalBatchSampler` itself plans the
batches and a thread pool reads the file bytes ahead of the pipeline; DALI still does all the
decoding, resizing and normalising. The plan runs on into the next epoch, so DALI's prefetching
never has to stop at an epoch boundary; only an unexpected `set_epoch` (a resume, or an epoch
that was abandoned half way) rebuilds the pipeline.

Unusable files (zero-byte, truncated, non-image) would raise inside DALI mid-epoch, so a cached
`data.preflight` pass finds them at build time and each is replaced by the next usable file
(`folder.replacements`), the rule the torch loader applies on the fly: the order, epoch length
and `skipped` count match it. File bytes are read through `folder.Split`, like the torch
loader's. Each sample's augmentation comes from DALI's RNG and does not match the torch loader's
pixel for pixel; its distribution does (crop, flip, `data.auto_augment` through
`nvidia.dali.auto_aug`, `data.random_erasing` through `fn.erase`: data/augment.py).
"""

from __future__ import annotations

import gc
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from data import DataError, RankInfo, augment, folder
from data.sampler import GlobalBatchSampler, train_crop_at, val_range

# nvJPEG buffers sized for the largest ImageNet image, so the training decoder allocates once instead
# of growing mid-run (NVIDIA's DALI ResNet-50 examples do the same).
PREALLOCATE = dict(device_memory_padding=211025920, host_memory_padding=140544512,
                   preallocate_width_hint=5980, preallocate_height_hint=6430)
READ_AHEAD = 4  # batches of file bytes read ahead of what the pipeline asked for

# A DALI pipeline is not fork-safe: a forked child (a torch DataLoader worker) whose cyclic GC
# collects a pipeline it inherited crashes in DALI's teardown, whose threads exist only in the parent
# (a segfault in CI: one test's dropped DALI loader, the next test's torch workers). A child never uses
# what it inherited, so it freezes it: its GC leaves those objects alone (tests/test_dali.py).
os.register_at_fork(after_in_child=gc.freeze)


class Feed:
    """External source: (encoded bytes, labels, sample indices) of each planned batch, read ahead
    by a thread pool from the split. `plan` yields (sample indices, output size) per batch and may
    be infinite; the size is a per-sample input of the resize, so progressive resizing needs no
    rebuild. `subst[i]` is the sample read in place of sample i (folder.replacements)."""

    def __init__(self, split: folder.Split, subst: np.ndarray, plan, workers: int, sized: bool = True):
        self.split, self.subst, self.plan, self.sized = split, subst, iter(plan), sized
        self.workers = max(1, workers)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dali-read")
        self.ahead: deque = deque()

    def _read(self, samples: list[int]) -> list[np.ndarray]:
        return [self.split.read_bytes(i) for i in samples]

    def _submit(self) -> None:
        indices, size = next(self.plan)
        reads = self.subst[np.asarray(indices, dtype=np.int64)].tolist()
        # One task per thread and batch: a future per sample costs more than a packed read
        # (benchmarks/read_path.py).
        step = -(-len(reads) // self.workers)
        chunks = [self.pool.submit(self._read, reads[b:b + step]) for b in range(0, len(reads), step)]
        self.ahead.append((indices, reads, size, chunks))

    def __call__(self):
        while len(self.ahead) < READ_AHEAD:
            self._submit()
        indices, reads, size, chunks = self.ahead.popleft()
        # Labels, indices and sizes as one dense array each: DALI takes those twice as fast as a
        # list of per-sample 0-d arrays.
        labels = np.array([self.split.label(i) for i in reads], dtype=np.int64)
        sizes = np.full((len(reads), 2), size, dtype=np.float32)
        out = [x for c in chunks for x in c.result()], labels, np.asarray(indices, dtype=np.int64), sizes
        return out if self.sized else out[:3]  # validation sizes come from the config

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def val_geometry(shape, resize: int, crop: int):
    """torchvision's `Resize(resize)` + `CenterCrop(crop)` geometry as DALI graph nodes, from the
    encoded image's (H, W, C): the longer side becomes int(resize * long / short), where DALI's
    `resize_shorter` would round it (43 instead of 42 px for 40x30 -> 32), and the crop offset
    rounds half to even like Python's round(), where DALI's crop_pos rounds half up (ImageNet's
    375x500 -> 256x341 -> 224: offset 58 in torchvision, 59 in DALI). Returns the (H, W) output
    size of the resize and the crop positions that make DALI's anchor torchvision's."""
    from nvidia.dali import fn, types

    h, w = shape[0], shape[1]
    tall = h > w  # torchvision: the width is the short side when w <= h
    out_h = tall * (resize * h // w) + (1 - tall) * resize
    out_w = (1 - tall) * (resize * w // h) + tall * resize

    def pos(n):  # n = free pixels; anchor = round-half-even(n / 2), as a fraction of n for DALI
        k = n // 2
        anchor = k + (n - 2 * k) * (k - 2 * (k // 2))  # odd n: k + 1 when k is odd
        return fn.cast(anchor, dtype=types.FLOAT) / fn.cast(n + (n == 0), dtype=types.FLOAT)

    return fn.cast(fn.stack(out_h, out_w), dtype=types.FLOAT), pos(out_h - crop), pos(out_w - crop)


def pad_crop(images, shape, size, pad: int):
    """torchvision's RandomCrop(size, padding=pad, pad_if_needed=True): a window whose corner is
    uniform over [-pad, H - size + pad] x [-pad, W - size + pad], zeros outside the image. The floor
    is explicit: DALI's cast rounds to nearest, which gave the end offsets half the probability and
    reached pad + 1 (tests/test_augment.py)."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    def corner(extent, out):  # integer uniform in [-pad, extent - out + pad]
        span = fn.cast(extent, dtype=types.FLOAT) - out + float(2 * pad + 1)
        k = dmath.min(dmath.floor(fn.random.uniform(range=[0.0, 1.0]) * span), span - 1)
        return fn.cast(k, dtype=types.INT32) - pad

    start = fn.stack(corner(shape[0], size[0]), corner(shape[1], size[1]))
    return fn.slice(images, start=start, shape=fn.cast(size, dtype=types.INT32), axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=0)


def make_pipeline(feed: Feed, train: bool, cfg, gpu: bool, hwc: bool, **kw):
    """decode (+ random crop) → resize → crop/flip/normalise; outputs images, labels, indices."""
    from nvidia.dali import fn, pipeline_def, types

    mean, std = folder.normalisation(cfg)

    @pipeline_def(enable_conditionals=train and cfg.auto_augment != "none", **kw)  # auto_aug branches per sample
    def pipe():
        n = 4 if feed.sized else 3  # + the per-sample output size of the training resize
        outputs = fn.external_source(source=feed, num_outputs=n, batch=True,
                                     dtype=[types.UINT8, types.INT64, types.INT64, types.FLOAT][:n])
        data, labels, index, size = (*outputs, None)[:4]
        # RGB output: CMYK and grayscale JPEGs and PNGs named .JPEG all come out as 3 channels.
        decoder = dict(device="mixed", hw_decoder_load=0.65) if gpu else dict(device="cpu")
        if train and cfg.crop == "pad":
            images = fn.decoders.image(data, output_type=types.RGB, **decoder)
            images = pad_crop(images, fn.peek_image_shape(data), size, cfg.pad)
            mirror = fn.random.coin_flip(probability=0.5) if cfg.hflip else 0
            crop = {}
        elif train:
            images = fn.decoders.image_random_crop(data, output_type=types.RGB, random_area=[cfg.min_scale, 1.0],
                                                   random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=100,
                                                   **decoder, **(PREALLOCATE if gpu else {}))
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
            mirror = fn.random.coin_flip(probability=0.5) if cfg.hflip else 0
            crop = {}
        else:
            out_size, pos_y, pos_x = val_geometry(fn.peek_image_shape(data), cfg.val_resize, cfg.val_crop)
            images = fn.decoders.image(data, output_type=types.RGB, **decoder)
            images = fn.resize(images, size=out_size, interp_type=types.INTERP_LINEAR, antialias=True)
            mirror, crop = 0, dict(crop=(cfg.val_crop, cfg.val_crop), crop_pos_y=pos_y, crop_pos_x=pos_x)
        if train and cfg.auto_augment != "none":  # uint8 HWC, before the flip: data/augment.py says why
            images = augment.dali_auto_augment(images, size, cfg)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC" if hwc else "CHW",
                                          mean=mean, std=std, mirror=mirror, **crop)
        if train and cfg.random_erasing:  # on the normalised image, as torchvision's recipes
            images = augment.dali_random_erasing(images, size, cfg.random_erasing)
        return images, labels.gpu() if gpu else labels, index

    return pipe()


class DaliLoader:
    """Runs one DALI pipeline over an endless plan of batches and cuts it into epochs."""

    def __init__(self, split: folder.Split, subst: np.ndarray, train: bool, cfg, batch: int, device: torch.device,
                 gpu: bool, channels_last: bool, seed: int):
        self.split, self.subst, self.train, self.cfg, self.batch = split, subst, train, cfg, batch
        self.device, self.gpu, self.hwc, self.seed = device, gpu, channels_last, seed
        self.bad = subst != np.arange(len(split))
        self.skipped = 0
        self._iter = self._feed = None
        self._at = None  # where the running pipeline's plan continues, None: rebuild
        self.builds = 0  # pipelines built so far (one per run unless resumed or abandoned mid-epoch)
        self._keep = KeepAlive(device)

    def plan(self, position):
        """Endless list of sample-index batches starting at `position`."""
        raise NotImplementedError

    def _rebuild(self, position) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.close()
        self.builds += 1
        self._feed = Feed(self.split, self.subst, self.plan(position), self.cfg.workers, sized=self.train)
        pipe = make_pipeline(
            self._feed, self.train, self.cfg, self.gpu, self.hwc, batch_size=self.batch,
            num_threads=max(1, self.cfg.workers), device_id=(self.device.index or 0) if self.gpu else None,
            seed=hash((self.seed, position)) % 2**31, prefetch_queue_depth=2)
        self._iter = DALIGenericIterator(pipe, ["images", "labels", "index"], prepare_first_batch=False)

    def batches(self, position, count: int, following):
        """`count` batches of (images, labels, sample indices) from `position`; afterwards the
        pipeline stands at `following` unless the caller stopped early."""
        if self._at != position or self._iter is None:
            self._rebuild(position)
        self._at = None
        for _ in range(count):
            out = next(self._iter)[0]
            self._keep.hold(out)
            images, labels = out["images"], out["labels"].view(-1).long()
            index = out["index"].view(-1).numpy()
            if self.hwc:
                images = images.permute(0, 3, 1, 2)  # NCHW view with channels_last strides
            self.skipped += int(self.bad[index].sum())
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True), index
        self._at = following

    def close(self) -> None:
        """Shut the pipeline down now: its decoder holds ~1.6 GiB of GPU and 2 GiB of pinned memory
        (PREALLOCATE x threads) that the cyclic GC would free only at some later collection."""
        if getattr(self, "_feed", None) is not None:
            self._feed.close()
        if getattr(self, "_iter", None) is not None:
            self._keep.release_all()
            for pipe in self._iter._pipes:
                pipe._shutdown()  # what DALI's own Pipeline.__del__ does
        self._iter = self._feed = None

    def __del__(self):
        self.close()


class KeepAlive:
    """Holds each DALI batch until torch's stream has finished reading it, without a host sync.

    With DALI's dynamic executor (its default since 1.40, `exec_dynamic`) the iterator returns
    `torch.from_dlpack` views of DALI's own buffers and releases them to DALI right away
    (plugin/pytorch `DALIGenericIterator.__next__`: `copy = not is_exec_dynamic`, then
    `release_outputs()`). `from_dlpack` makes torch's stream wait until the data is ready, but
    the buffer goes back to DALI as soon as the host drops the tensor, while the step's kernels
    that read it may still be queued on torch's stream (the host runs ahead: nothing in the step
    synchronizes). So each batch's outputs stay referenced until an event recorded on torch's
    current stream after the batch was handed on has completed; `query()` never blocks. On the
    CPU pipeline there is nothing to hold.
    """

    def __init__(self, device: torch.device, event=None):
        self.cuda = device.type == "cuda"
        self.event = event or (lambda: torch.cuda.Event())
        self.held = deque()  # (event or None, outputs)
        self.last = None

    def hold(self, outputs) -> None:
        if not self.cuda:
            return
        if self.last is not None:  # the previous batch's step has been queued by now
            event = self.event()
            event.record()
            self.held.append((event, self.last))
        self.last = outputs
        while self.held and self.held[0][0].query():
            self.held.popleft()

    def release_all(self) -> None:
        """Before a pipeline shuts down (a rebuild, the end): wait once for torch's stream."""
        if self.cuda and (self.held or self.last is not None):
            torch.cuda.current_stream().synchronize()
        self.held.clear()
        self.last = None


class DaliTrainLoader(DaliLoader):
    def __init__(self, sampler: GlobalBatchSampler, **kw):
        super().__init__(batch=sampler.batch, **kw)
        self.sampler = sampler
        self.num_samples = sampler.n
        self.steps_per_epoch = sampler.steps_per_epoch

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_sample)

    def __len__(self) -> int:  # steps left in the epoch from `start_sample`
        return len(self.sampler) // self.batch

    def plan(self, position):
        epoch, start = position
        s = self.sampler
        sampler = GlobalBatchSampler(s.n, s.batch, s.rank, s.world, s.seed, s.shuffle, s.repeats)
        while True:
            sampler.set_epoch(epoch, start)
            keys, size = [i for i, _ in sampler], train_crop_at(self.cfg, epoch)
            yield from ((keys[b:b + s.batch], size) for b in range(0, len(keys), s.batch))
            epoch, start = epoch + 1, 0

    def iter_indexed(self):
        """Like iter(), with the dataset index of every sample (tests, debugging)."""
        epoch, start = self.sampler.epoch, self.sampler.start
        return self.batches((epoch, start), len(self), following=(epoch + 1, 0))

    def __iter__(self):
        for images, labels, _ in self.iter_indexed():
            yield images, labels


class DaliValLoader(DaliLoader):
    def __init__(self, num_samples: int, share: range, **kw):
        super().__init__(**kw)
        self.num_samples, self.share = num_samples, share

    def __len__(self) -> int:
        return -(-len(self.share) // self.batch)

    def plan(self, position):
        chunks = [(list(self.share[b:b + self.batch]), self.cfg.val_crop)
                  for b in range(0, len(self.share), self.batch)]
        while True:  # the same share every evaluation; the last batch may be partial
            yield from chunks

    def iter_indexed(self):
        return self.batches(0, len(self), following=0) if len(self.share) else iter(())

    def __iter__(self):
        for images, labels, _ in self.iter_indexed():
            yield images, labels


def planned_replacements(split: folder.Split, workers: int) -> np.ndarray:
    """The index read in place of each sample, from a (cached) preflight of the split."""
    return folder.replacements(len(split), split.find_unusable(workers))


def use_gpu(dali_device: str, device: torch.device) -> bool:
    cuda = torch.cuda.is_available() and device.type == "cuda"
    if dali_device == "gpu" and not cuda:
        raise DataError("data.dali_device: gpu needs a CUDA device; use cpu or auto")
    return cuda and dali_device != "cpu"


def _check_dali() -> None:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise DataError("data.loader: dali needs `pip install nvidia-dali-cuda130` (-cuda120 with a CUDA 12 "
                        "torch)") from None


def _common(cfg, info: RankInfo, seed: int, channels_last: bool) -> dict:
    return dict(cfg=cfg, device=info.device, gpu=use_gpu(cfg.dali_device, info.device), channels_last=channels_last,
                seed=seed * 1000 + info.rank)


def _val(cfg, split: folder.Split, info: RankInfo, workers: int, kw: dict) -> DaliValLoader:
    return DaliValLoader(len(split), val_range(len(split), info.rank, info.world_size), split=split,
                         subst=planned_replacements(split, workers), train=False, batch=folder.val_batch_size(cfg),
                         **kw)


def build(cfg, info: RankInfo, *, seed: int, channels_last: bool, batch: int | None = None):
    """(train loader, val loader, class names) for `cfg.root`, already sharded for this rank."""
    batch = batch or cfg.batch_size  # the train micro-batch (the trainer's split of the global batch)
    _check_dali()
    train_split, val_split = folder.open_splits(cfg)
    workers = cfg.workers or os.cpu_count() or 1
    kw = _common(cfg, info, seed, channels_last)
    sampler = folder.train_sampler(cfg, train_split, info, seed, batch)
    train = DaliTrainLoader(sampler, split=train_split, subst=planned_replacements(train_split, workers),
                            train=True, **kw)
    return train, _val(cfg, val_split, info, workers, kw), train_split.classes


def build_val(cfg, info: RankInfo, *, seed: int, channels_last: bool):
    """(val loader, class names), reading (and preflighting) only the val split."""
    _check_dali()
    split = folder.open_val(cfg)
    kw = _common(cfg, info, seed, channels_last)
    return _val(cfg, split, info, cfg.workers or os.cpu_count() or 1, kw), split.classes
