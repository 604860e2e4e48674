"""Input pipeline alone: DALI against the torchvision DataLoader on the same ImageNet-sized JPEGs.

    python benchmarks/loader.py                     # DALI on CPU threads vs torch workers, all CPUs
    python benchmarks/loader.py --device cuda       # DALI decoding on the GPU (nvJPEG / HW decoder)

Both loaders are built by the project's own `data.dali` / `data.torch_loader` with the ResNet-50
training augmentation (random-resized crop 224 with min_scale 0.08, flip, normalise) and
`--threads` DALI threads = torch DataLoader workers. The JPEGs are an upscaled copy of the demo
images (500x375, quality 90, ImageNet's typical size and quality), made once. Each repeat builds
both loaders afresh, drops `--warmup` batches (pipeline start, worker start-up), then times
`--batches` batches of `--batch`; the loaders alternate (A B, B A, ...) so drift in the machine's
speed hits both, and a loader is shut down before the other is timed (no background prefetching).
Images per second are of the finished batches as the trainer receives them: normalised float
tensors, channels_last, on `--device`.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from train.hardware import machine_header  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import imagenet_like  # noqa: E402
from data import build_loaders  # noqa: E402
from train.config import DataConfig  # noqa: E402
from train.distributed import DistInfo  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def shut_down(train) -> None:
    """Stop a loader's background work so it cannot steal CPU from the next measurement."""
    if hasattr(train, "close"):  # DALI: the feed's read pool and the pipeline
        train.close()
    else:  # torch: persistent workers would go on prefetching the abandoned epoch
        it = getattr(train.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        train.loader._iterator = None
    del train
    gc.collect()


def rate(cfg: DataConfig, device: torch.device, epoch: int, warmup: int, batches: int) -> float:
    """img/s of `batches` training batches after `warmup`, on freshly built loaders."""
    train, _, _ = build_loaders(cfg, DistInfo(0, 1, 0, device), seed=epoch, channels_last=True)
    train.set_epoch(epoch)
    it = iter(train)
    for _ in range(warmup):
        next(it)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        images, _labels = next(it)
    sync(device)
    elapsed = time.perf_counter() - t0
    assert images.shape == (cfg.batch_size, 3, cfg.train_crop, cfg.train_crop), images.shape
    del it, images, _labels
    shut_down(train)
    return batches * cfg.batch_size / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: DALI on CPU threads; cuda: DALI decodes on the GPU, both loaders deliver there")
    p.add_argument("--images", type=int, default=3000, help="training JPEGs in the upscaled copy")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="DALI threads and torch DataLoader workers (default: all CPUs)")
    p.add_argument("--batches", type=int, default=25, help="timed batches per loader and repeat")
    p.add_argument("--warmup", type=int, default=4, help="batches dropped before timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=224, help="train crop")
    p.add_argument("--demo", default=str(ROOT / "datasets/fashion-mnist"), help="source JPEG folders")
    p.add_argument("--jpegs", default="", help="where the upscaled copy goes (default /tmp/imagenet-like-<images>)")
    args = p.parse_args()
    print(machine_header(torch.device(args.device)))

    need = (args.warmup + args.batches) * args.batch
    if args.images < need:
        raise SystemExit(f"--images {args.images} < {need} = (warmup + batches) x batch: an epoch would end")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/loader.py: no CUDA GPU visible (use --device cpu)")
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise SystemExit("benchmarks/loader.py: needs `pip install nvidia-dali-cuda120`") from None

    t0 = time.perf_counter()
    root = imagenet_like(Path(args.demo), Path(args.jpegs or f"/tmp/imagenet-like-{args.images}"), args.images)
    print(f"JPEGs: {root} ({time.perf_counter() - t0:.0f}s to make or find)", flush=True)
    base = DataConfig(root=str(root), batch_size=args.batch, workers=args.threads, train_crop=args.size,
                      val_resize=args.size * 8 // 7, val_crop=args.size, min_scale=0.08, hflip=True)
    cfgs = {"dali": replace(base, loader="dali", dali_device="gpu" if device.type == "cuda" else "cpu"),
            "torch": replace(base, loader="torch")}
    t0 = time.perf_counter()
    one = DistInfo(0, 1, 0, device)
    build_loaders(cfgs["dali"], one, seed=0, channels_last=True)[0].close()  # the preflight pass, cached, untimed
    print(f"preflight: {time.perf_counter() - t0:.0f}s", flush=True)

    load0 = os.getloadavg()[0]
    rates: dict[str, list[float]] = {"dali": [], "torch": []}
    for r in range(args.repeats):
        for name in ("dali", "torch") if r % 2 == 0 else ("torch", "dali"):
            rates[name].append(rate(cfgs[name], device, r, args.warmup, args.batches))
            print(f"repeat {r + 1}/{args.repeats}  {name:<5} {rates[name][-1]:8.1f} img/s", flush=True)

    med = {k: statistics.median(v) for k, v in rates.items()}
    dali_kind = "DALI GPU decode" if device.type == "cuda" else "DALI CPU"
    print(f"\n{args.images} JPEGs 500x375 q90 -> {args.size}px (min_scale 0.08, flip, normalise), batch {args.batch}, "
          f"{args.threads} threads/workers, {args.batches} batches x {args.repeats} repeats, device {device}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, DALI {nvidia.dali.__version__}, "
          f"load average {load0:.1f} before / {os.getloadavg()[0]:.1f} after (other processes skew it)")
    for name, label in (("dali", dali_kind), ("torch", "torch DataLoader")):
        spread = ", ".join(f"{x:.0f}" for x in rates[name])
        print(f"  {label:<17} {med[name]:8.1f} img/s median  ({spread})")
    print(f"  ratio DALI/torch  {med['dali'] / med['torch']:8.2f}x")


if __name__ == "__main__":
    main()
