"""Ours against a plain reference training script on the same CPU, side by side.

The baseline is what pytorch/examples' imagenet/main.py does on one process: torchvision's
resnet18, ImageFolder + PIL + transforms (RandomResizedCrop 224, flip, ToTensor, Normalize) in a
DataLoader with 2 workers, SGD, fp32. Ours is train/main.py with configs/imagenet_resnet18.yaml
and its defaults (amp auto, channels_last, threads from the CPU share, DALI CPU decoding) at the
same batch, on the same 500x375 JPEG folder. Each side is timed over the same steps after its
warm-up; runs alternate so that drift in machine speed hits both. The ratio is printed last.

    python benchmarks/plain_loop.py [--images 640] [--steps 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gpu import imagenet_like  # noqa: E402
from train.hardware import machine_header  # noqa: E402


def plain(root: Path, batch: int, steps: int, warmup: int) -> float:
    """img/s of the reference loop over `steps` steps after `warmup`."""
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    train = datasets.ImageFolder(str(root / "train"), transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, num_workers=2, drop_last=True)
    model = torchvision.models.resnet18(num_classes=len(train.classes))
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    done, t0 = 0, None
    while True:
        for images, target in loader:
            if done == warmup:
                t0 = time.perf_counter()
            loss = criterion(model(images), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done == warmup + steps:
                return steps * batch / (time.perf_counter() - t0)


def ours(root: Path, batch: int, steps: int, warmup: int, tmp: Path, overrides: list[str]) -> float:
    """img/s of train/main.py over the same steps (TensorBoard's train/images_per_s after warm-up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    name = f"ours{time.monotonic_ns()}"
    cmd = [sys.executable, "train/main.py", "--config", "configs/imagenet_resnet18.yaml", f"data.root={root}",
           f"data.batch_size={batch}", "data.workers=2", f"train.max_steps={warmup + steps}", "train.resume=off",
           f"log.dir={tmp}", f"log.name={name}", f"log.every={warmup}", "log.grad_norm_every=0", "log.graph=false",
           "log.images=false", "log.feature_maps=false", "checkpoint.async_save=false", *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    acc = EventAccumulator(str(tmp / name / "tb"))
    acc.Reload()
    speeds = [e.value for e in acc.Scalars("train/images_per_s")]  # one per `warmup` steps
    return statistics.harmonic_mean(speeds[1:])  # equal intervals: the rate over all steps after the first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=640)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=8, help="a multiple of --warmup")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data", type=Path, default=ROOT / "datasets/fashion-mnist")
    args = p.parse_args()
    print(machine_header())
    root = imagenet_like(args.data, Path(tempfile.gettempdir()) / f"imagenet-like-{args.images}", args.images)
    variants = {"ours (defaults)": [], "ours dist.cpu_threads=1": ["dist.cpu_threads=1"],
                "ours amp=off channels_last=false": ["train.amp=off", "model.channels_last=false"]}
    rows: dict[str, list[float]] = {"plain": [], **{k: [] for k in variants}}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            rows["plain"].append(plain(root, args.batch, args.steps, args.warmup))
            for name, overrides in variants.items():
                rows[name].append(ours(root, args.batch, args.steps, args.warmup, Path(tmp), overrides))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"resnet18, batch {args.batch}, 224 px, {args.images} 500x375 JPEGs, {args.steps} steps after "
          f"{args.warmup} x {args.repeats} repeats")
    for k, v in med.items():
        print(f"{k:36s} {v:8.1f} img/s   ratio to plain {v / med['plain']:.2f}")
    print(json.dumps({k: round(v / med["plain"], 3) for k, v in med.items()}))


if __name__ == "__main__":
    main()
