"""How a CPU rank should split its cores between intra-op threads and decode workers: the
candidates train/hardware.py chose between, switched every few steps inside one training run.

One process trains with the torch loader (persistent decode workers) on 500x375 JPEGs and, every
`--k` steps, switches to the next variant: intra-op threads and the decode workers' nice value
(os.setpriority on their pids). Variants alternate in one run, so drift in machine speed and the
load of other jobs hit all of them; each variant's ratio to the first is the median of the
per-round ratios. OpenMP's wait policy is read once, when torch loads, so it is compared across
runs: set OMP_WAIT_POLICY=PASSIVE or GOMP_SPINCOUNT=10000 in the environment of a second run and
compare its ratios. What train/hardware.py's probe and `cpu_threads` would choose is printed first.

    python benchmarks/cpu_split.py                                          # resnet18, 224 px, fp32: compute-bound
    python benchmarks/cpu_split.py --model resnet20 --crop 32 --batch 128 --amp bf16   # decode-heavy
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.plain_loop import imagenet_like  # noqa: E402
from data import torch_loader  # noqa: E402
from train import hardware  # noqa: E402
from train.config import Config, ModelConfig  # noqa: E402
from train.models import build  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--amp", default="off", choices=["off", "bf16"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--variants", default="1:0,2:0,2:10", help="threads:nice of the decode workers, ...")
    p.add_argument("--k", type=int, default=2, help="steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=640)
    p.add_argument("--data", type=Path, default=ROOT / "datasets/fashion-mnist")
    args = p.parse_args()
    share = len(os.sched_getaffinity(0))
    print(hardware.machine_header(), f"| OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')} "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '-')} | load {os.getloadavg()[0]:.1f}")
    root = imagenet_like(args.data, Path(tempfile.gettempdir()) / f"plain-loop-{args.images}", args.images)
    cfg = Config()
    cfg.data.root, cfg.data.batch_size, cfg.data.workers, cfg.data.train_crop = str(root), args.batch, args.workers, \
        args.crop
    channels_last = args.amp == "bf16"
    info = SimpleNamespace(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train, _, classes = torch_loader.build(cfg.data, info, seed=0, channels_last=channels_last)
    model = build(ModelConfig(name=args.model, channels_last=channels_last), len(classes))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    step = hardware.probe_threads(model, args.batch, args.crop, channels_last, args.amp, tuple(sorted({1, share})))
    threads, nice, why = hardware.cpu_threads(share, args.workers, step)
    print(f"hardware.cpu_threads would choose {threads} thread(s), workers at nice +{nice}: {why}")

    opt = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    crit = torch.nn.CrossEntropyLoss()

    def batches():
        epoch = 0
        while True:
            train.set_epoch(epoch)
            yield from train
            epoch += 1
    data = batches()

    def steps(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = next(data)
            with torch.autocast("cpu", torch.bfloat16, enabled=args.amp == "bf16"):
                loss = crit(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return n * args.batch / (time.perf_counter() - t0)

    variants = [tuple(map(int, v.split(":"))) for v in args.variants.split(",")]
    torch.set_num_threads(max(t for t, _ in variants))
    steps(2)  # workers started, oneDNN warmed up
    workers = [w.pid for w in train.loader._iterator._workers]
    rates: dict[tuple[int, int], list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            torch.set_num_threads(v[0])
            for pid in workers:
                os.setpriority(os.PRIO_PROCESS, pid, v[1])
            rates[v].append(steps(args.k))
    print(f"{args.model} {args.crop} px batch {args.batch} amp {args.amp}, {args.workers} torch workers, "
          f"{args.k} steps x {args.rounds} rounds per variant; load {os.getloadavg()[0]:.1f} at the end")
    first = rates[variants[0]]
    for v, x in rates.items():
        ratio = statistics.median(a / b for a, b in zip(x, first))
        print(f"  {v[0]} thread(s), workers nice {v[1]:2d}: median {statistics.median(x):7.2f} img/s "
              f"(min {min(x):.2f}, max {max(x):.2f}); vs the first: {ratio:.2f}x")


if __name__ == "__main__":
    main()
