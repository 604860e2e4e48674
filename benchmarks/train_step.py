"""Trainer overhead: images/s of train_one_epoch (hooks, metrics, schedule, monitor) against a bare
forward/backward/step loop on the same model, batch and synthetic data, measured side by side.

    python benchmarks/train_step.py                      # CPU: small ResNet, 32x32
    python benchmarks/train_step.py --model resnet50 --batch 256 --size 224 --amp fp16   # GPU

Runs alternate (bare, trainer, bare, trainer, ...) so drift in machine speed hits both; the ratio
of medians is printed last. Goal: >= 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data.synthetic import SyntheticLoader  # noqa: E402
from train.config import Config  # noqa: E402
from train.distributed import DistInfo  # noqa: E402
from train.loop import TrainState, autocast, train_one_epoch  # noqa: E402
from train.monitor import Monitor  # noqa: E402
from train.optim import build_optimizer, build_scheduler  # noqa: E402
from train.trainer import Hooks, StopSignal, build_model  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare(model, loader, optimizer, criterion, device, amp) -> float:
    sync(device)
    t0 = time.perf_counter()
    for images, labels in loader:
        with autocast(device, amp):
            loss = criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return time.perf_counter() - t0


def trainer(model, loader, optimizer, scheduler, scaler, criterion, hooks, device, amp, log_every) -> float:
    sync(device)
    t0 = time.perf_counter()
    train_one_epoch(model, loader, optimizer, scheduler, scaler, criterion, TrainState(), amp, 0.0, log_every, hooks)
    sync(device)
    return time.perf_counter() - t0


def arguments(doc: str, steps: int) -> argparse.ArgumentParser:
    """The options every trainer-step benchmark shares (this one and benchmarks/monitor.py)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--stem", default="auto")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--amp", default="off")
    return p


def setup(args, cfg: Config) -> SimpleNamespace:
    """Model (DDP-free, 1 rank), synthetic loader, optimizer, schedule, scaler, loss for `args`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    cfg.model.name, cfg.model.stem = args.model, args.stem
    info = DistInfo(0, 1, 0, device)
    model, bare_model = build_model(cfg, 10, info)
    optimizer = build_optimizer(cfg.optim, model, args.batch)
    return SimpleNamespace(
        device=device, info=info, model=model, bare=bare_model, optimizer=optimizer,
        loader=SyntheticLoader(args.batch * args.steps, args.batch, 1, args.size, 10, device, True, 0),
        scheduler=build_scheduler(cfg.schedule, optimizer, args.steps, 1000),
        scaler=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"), criterion=nn.CrossEntropyLoss())


def main() -> None:
    p = arguments(__doc__, steps=30)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args()
    cfg = Config()
    cfg.log.every = args.log_every
    b = setup(args, cfg)
    device, info, model, loader, optimizer, scheduler, scaler, criterion = (
        b.device, b.info, b.model, b.loader, b.optimizer, b.scheduler, b.scaler, b.criterion)
    with tempfile.TemporaryDirectory() as tmp:
        monitor = Monitor(Path(tmp), True, 1, args.steps, 1, progress="off", tensorboard=True)
        hooks = Hooks(cfg, info, monitor, save=lambda *a, **k: None, global_batch=args.batch, stop=StopSignal())
        bare(model, loader, optimizer, criterion, device, args.amp)  # warm-up both paths
        trainer(model, loader, optimizer, scheduler, scaler, criterion, hooks, device, args.amp, args.log_every)
        t_bare, t_trainer = [], []
        for _ in range(args.repeats):
            t_bare.append(bare(model, loader, optimizer, criterion, device, args.amp))
            t_trainer.append(trainer(model, loader, optimizer, scheduler, scaler, criterion, hooks, device,
                                     args.amp, args.log_every))
        monitor.close()
    n = args.batch * args.steps
    ips_bare, ips_trainer = n / statistics.median(t_bare), n / statistics.median(t_trainer)
    print(f"device {device}, {args.model}, batch {args.batch}, {args.size}px, amp {args.amp}, "
          f"{args.steps} steps x {args.repeats} repeats")
    print(f"bare loop   {ips_bare:10.1f} img/s")
    print(f"trainer     {ips_trainer:10.1f} img/s")
    print(f"trainer/bare ratio: {ips_trainer / ips_bare:.3f}")


if __name__ == "__main__":
    main()
