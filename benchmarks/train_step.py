"""Trainer overhead: images/s of train/trainer.py `train_epoch` (metrics, schedule, monitor, checkpoint
cadence) against a bare forward/backward/step loop on the same model, batch and synthetic data, measured side by side.

    python benchmarks/train_step.py                      # CPU: small ResNet, 32x32
    python benchmarks/train_step.py --model resnet50 --batch 256 --size 224 --amp fp16   # GPU

Runs alternate (bare, trainer, bare, trainer, ...) so drift in machine speed hits both; the ratio
of medians is printed last. Goal: >= 0.95.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from train.checkpoint import Checkpointer  # noqa: E402
from train.config import Config  # noqa: E402
from train.distributed import DistInfo  # noqa: E402
from train.hardware import machine_header  # noqa: E402
from train.monitor import Monitor  # noqa: E402
from train.optim import build_optimizer, build_scheduler  # noqa: E402
from train.trainer import Plan, Run, StopSignal, TrainState, autocast, build_model, train_epoch  # noqa: E402


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


def trainer(run: Run, mon: Monitor) -> float:
    """One epoch of the trainer's own step loop with the monitor `mon`."""
    sync(run.info.device)
    t0 = time.perf_counter()
    run.state, run.monitor = TrainState(), mon
    train_epoch(run)
    sync(run.info.device)
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


def setup(args, cfg: Config, tmp: Path) -> SimpleNamespace:
    """Model (DDP-free, 1 rank), synthetic loader, optimizer, schedule, scaler, loss for `args`, and
    the trainer's Run around them (monitor set per call of `trainer`; checkpoints never due)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    cfg.model.name, cfg.model.stem = args.model, args.stem
    info = DistInfo(0, 1, 0, device)
    model, bare_model = build_model(cfg, 10, info)
    optimizer = build_optimizer(cfg.optim, model, args.batch)
    loader = SyntheticLoader(args.batch * args.steps, args.batch, 1, args.size, 10, device, True, 0)
    run = Run(cfg=cfg, info=info, plan=Plan(micro_batch=args.batch, accumulate=1, global_batch=args.batch,
                                            steps_per_epoch=args.steps, amp=args.amp, threads=torch.get_num_threads()),
              model=model, bare=bare_model, optimizer=optimizer,
              scheduler=build_scheduler(cfg.schedule, optimizer, args.steps, 1000, args.batch),
              scaler=torch.amp.GradScaler(device.type, enabled=args.amp == "fp16"), criterion=nn.CrossEntropyLoss(),
              ema=None, train_loader=loader, val_loader=None, checkpointer=Checkpointer(cfg.checkpoint, tmp, info),
              monitor=None, stop=StopSignal())
    return SimpleNamespace(device=device, info=info, model=model, bare=bare_model, optimizer=optimizer, run=run,
                           loader=loader)


def monitor(cfg: Config, args, info, tmp: Path, tensorboard: bool = True) -> Monitor:
    """The trainer's Monitor for a one-rank synthetic run of `args.steps` steps per epoch."""
    log_cfg = dataclasses.replace(cfg.log, tensorboard=tensorboard, progress="off")
    return Monitor(log_cfg, run_dir=tmp, info=info, data=cfg.data, epochs=1000, steps_per_epoch=args.steps,
                   global_batch=args.batch)


def main() -> None:
    p = arguments(__doc__, steps=30)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args()
    cfg = Config()
    cfg.log.every = args.log_every
    with tempfile.TemporaryDirectory() as tmp:
        b = setup(args, cfg, Path(tmp))
        print(machine_header(b.device))
        mon = monitor(cfg, args, b.info, Path(tmp))
        criterion = b.run.criterion
        bare(b.model, b.loader, b.optimizer, criterion, b.device, args.amp)  # warm-up both paths
        trainer(b.run, mon)
        t_bare, t_trainer = [], []
        for _ in range(args.repeats):
            t_bare.append(bare(b.model, b.loader, b.optimizer, criterion, b.device, args.amp))
            t_trainer.append(trainer(b.run, mon))
        mon.close()
    n = args.batch * args.steps
    ips_bare, ips_trainer = n / statistics.median(t_bare), n / statistics.median(t_trainer)
    print(f"device {b.device}, {args.model}, batch {args.batch}, {args.size}px, amp {args.amp}, "
          f"{args.steps} steps x {args.repeats} repeats")
    print(f"bare loop   {ips_bare:10.1f} img/s")
    print(f"trainer     {ips_trainer:10.1f} img/s")
    print(f"trainer/bare ratio: {ips_trainer / ips_bare:.3f}")


if __name__ == "__main__":
    main()
