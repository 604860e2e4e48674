"""Ours against the two plain peer recipes on the same CPU and the same JPEGs, side by side.

Rows (torchvision's resnet18, batch 64, 224 px, one process, 2 loader workers, SGD, 500x375 JPEGs):
  plain          pytorch/examples' imagenet/main.py: ImageFolder + PIL, transforms v1
                 (RandomResizedCrop, flip, ToTensor, Normalize), fp32, torch's default threads
  tv_reference   torchvision's references/classification recipe: PIL + transforms v2
                 (RandomResizedCrop antialiased, flip, PILToTensor, ToDtype, Normalize), 2 intra-op
                 threads, fp32, loss and top-1 read every step as its MetricLogger does
  ours_fp32      train/main.py, configs/imagenet_resnet18.yaml with the torch loader, data.workers=2,
                 `train.amp=off model.channels_last=false`: fp32 in the peers' memory layout
  ours_fp32_cl   `train.amp=off` with the config's channels_last: what `amp: auto` gives a CPU
                 without native bf16
  ours_defaults  the same with the config's defaults (amp auto, channels_last)
  ours_dali      the defaults with the config's own loader (DALI decoding on the CPU)
Every row is its own process (so `--avx2` can set ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
before torch loads: an AVX2-only CPU, emulated) and is timed over the same steps after its warm-up.
Rows alternate within each repeat, in reverse order every other repeat, so that drift in machine
speed and the load of other jobs hit all of them; the ratios are the medians of the per-repeat
ratios. The load average before each run is printed: on a shared machine quote min and median.

    python benchmarks/plain_loop.py [--rows plain tv_reference ours_fp32 ours_fp32_cl ours_defaults] [--repeats 3] [--avx2]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
OURS = {"ours_fp32": ["data.loader=torch", "train.amp=off", "model.channels_last=false"],
        "ours_fp32_cl": ["data.loader=torch", "train.amp=off"],
        "ours_defaults": ["data.loader=torch"], "ours_dali": []}
ROWS = ["plain", "tv_reference", *OURS]


def imagenet_like(src: Path, dst: Path, count: int, size=(500, 375)) -> Path:
    """<dst>/{train,val}/<class>/*.JPEG: `count` training images (val a quarter), the demo's JPEGs of
    every class upscaled to ImageNet's typical size, quality 90; made once."""
    from PIL import Image

    if (dst / "done").exists():
        return dst
    for split, n in (("train", count), ("val", count // 4)):
        classes = sorted(d for d in (src / split).iterdir() if d.is_dir())
        for c in classes:
            for f in sorted(c.glob("*.JPEG"))[: n // len(classes)]:
                out = dst / split / c.name / f.name
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.open(f).convert("RGB").resize(size, Image.BILINEAR).save(out, quality=90)
    (dst / "done").touch()
    return dst


def peer(row: str, root: Path, batch: int, steps: int, warmup: int) -> float:
    """img/s of a peer recipe over `steps` steps after `warmup` (runs in its own process)."""
    import torch
    import torchvision
    from torchvision import datasets

    if row == "plain":  # pytorch/examples imagenet/main.py
        from torchvision import transforms as T

        transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    else:  # torchvision references/classification: ClassificationPresetTrain(use_v2=True, backend="pil")
        from torchvision.transforms import v2 as T

        torch.set_num_threads(2)
        transform = T.Compose([T.RandomResizedCrop(224, antialias=True), T.RandomHorizontalFlip(0.5),
                               T.PILToTensor(), T.ToDtype(torch.float, scale=True),
                               T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    train = datasets.ImageFolder(str(root / "train"), transform)
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, num_workers=2, drop_last=True)
    model = torchvision.models.resnet18(num_classes=len(train.classes)).train()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    done, t0 = 0, 0.0
    while True:
        for images, target in loader:
            if done == warmup:
                t0 = time.perf_counter()
            output = model(images)
            loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if row == "tv_reference":  # its MetricLogger: loss.item() and top-1 every step
                loss.item(), (output.argmax(1) == target).float().mean().item()
            done += 1
            if done == warmup + steps:
                return steps * batch / (time.perf_counter() - t0)


def ours(row: str, root: Path, batch: int, steps: int, warmup: int, tmp: Path, env: dict) -> float:
    """img/s of train/main.py over the same steps (TensorBoard's train/images_per_s after warm-up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    name = f"{row}-{time.monotonic_ns()}"
    cmd = [sys.executable, "train/main.py", "--config", "configs/imagenet_resnet18.yaml", f"data.root={root}",
           f"data.batch_size={batch}", "data.workers=2", f"train.max_steps={warmup + steps}", "train.resume=off",
           f"log.dir={tmp}", f"log.name={name}", f"log.every={warmup}", "log.grad_norm_every=0", "log.graph=false",
           "log.images=false", "log.feature_maps=false", "log.progress=lines", "checkpoint.async_save=false",
           *OURS[row]]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{row} failed:\n{r.stderr[-3000:]}")
    chosen = [line.split("] ", 1)[-1] for line in (r.stdout + r.stderr).splitlines()
              if any(f"] {k} " in line for k in ("amp", "threads", "compile"))]
    print("   ", " | ".join(chosen), flush=True)
    acc = EventAccumulator(str(tmp / name / "tb"))
    acc.Reload()
    speeds = [e.value for e in acc.Scalars("train/images_per_s")]  # one per `warmup` steps
    return statistics.harmonic_mean(speeds[1:])  # equal intervals: the rate over all steps after the first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=ROWS[:5], choices=ROWS)
    p.add_argument("--images", type=int, default=640)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="a multiple of --warmup")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--avx2", action="store_true", help="ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 in every row")
    p.add_argument("--data", type=Path, default=ROOT / "datasets/fashion-mnist")
    p.add_argument("--peer", help=argparse.SUPPRESS)
    args = p.parse_args()
    root = Path(tempfile.gettempdir()) / f"plain-loop-{args.images}"
    if args.peer:
        print(json.dumps(peer(args.peer, root, args.batch, args.steps, args.warmup)))
        return
    imagenet_like(args.data, root, args.images)
    env = {**os.environ, **(AVX2 if args.avx2 else {})}
    env.pop("OMP_NUM_THREADS", None)  # each recipe's own threads
    show = "from train.hardware import machine_header; print(machine_header())"
    header = subprocess.run([sys.executable, "-c", show], cwd=ROOT, env=env, capture_output=True, text=True).stdout
    print(header.strip() + (" [AVX2 emulated: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2]" if args.avx2 else ""))
    rows: dict[str, list[float]] = {r: [] for r in args.rows}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for row in args.rows if i % 2 == 0 else args.rows[::-1]:
                loads.append(os.getloadavg()[0])
                if row in OURS:
                    rate = ours(row, root, args.batch, args.steps, args.warmup, Path(tmp), env)
                else:
                    out = subprocess.run([sys.executable, __file__, "--peer", row, "--images", str(args.images),
                                          "--batch", str(args.batch), "--steps", str(args.steps),
                                          "--warmup", str(args.warmup)], cwd=ROOT, env=env, capture_output=True,
                                         text=True)
                    if out.returncode:
                        raise SystemExit(f"{row} failed:\n{out.stderr[-3000:]}")
                    rate = json.loads(out.stdout.strip().splitlines()[-1])
                rows[row].append(rate)
                print(f"repeat {i} {row:14s} {rate:7.2f} img/s (load {loads[-1]:.1f})", flush=True)
    peers = [r for r in ("plain", "tv_reference") if r in rows]
    print(f"\nresnet18, batch {args.batch}, 224 px, {args.images} 500x375 JPEGs, {args.steps} steps after "
          f"{args.warmup}, {args.repeats} repeats; load average min/median/max {min(loads):.1f}/"
          f"{statistics.median(loads):.1f}/{max(loads):.1f}\n")
    print("| row | img/s min | median | max | " + " | ".join(f"vs {p} (median of pairs)" for p in peers) + " |")
    print("|---|---|---|---|" + "---|" * len(peers))
    for row, v in rows.items():
        ratios = [f"{statistics.median(a / b for a, b in zip(v, rows[p])):.2f}x" for p in peers]
        print(f"| {row} | {min(v):.2f} | {statistics.median(v):.2f} | {max(v):.2f} | " + " | ".join(ratios) + " |")


if __name__ == "__main__":
    main()
