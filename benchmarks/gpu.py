"""Everything a lent GPU should measure, in one call, printed as one table at the end.

    python benchmarks/gpu.py                                  # GPU: resnet50, AMP fp16, batch 256
    python benchmarks/gpu.py --device cpu --model resnet20 --batch 32 --size 32 --steps 4 --warmup 1
                                                              # the same code path on a CPU (smoke)

Rows: trainer step img/s for synthetic data, DALI (GPU decode) and the torch loader over real
JPEGs (an ImageNet-sized copy of the demo images is made once: upscaled to 500x375, quality 90),
each with and without torch.compile; the DALI pipeline alone; SyncBatchNorm's cost per step and
its agreement with the CPU-capable cross-rank BN; fp16/bf16 loss against fp32 over the same
steps; peak memory. Every number is measured in this run on this device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import build_loaders  # noqa: E402
from train.config import Config  # noqa: E402
from train.distributed import DistInfo  # noqa: E402
from train.hardware import machine_header  # noqa: E402
from train.loop import autocast  # noqa: E402
from train.optim import build_optimizer  # noqa: E402
from train.trainer import build_model  # noqa: E402


def imagenet_like(src: Path, dst: Path, count: int, size=(500, 375)) -> Path:
    """<dst>/{train,val}/<class>/*.JPEG: demo JPEGs upscaled to ImageNet's typical size."""
    from PIL import Image

    if (dst / "done").exists():
        return dst
    for split in ("train", "val"):
        files = sorted((src / split).glob("*/*.JPEG"))[: count if split == "train" else count // 4]
        for f in files:
            out = dst / split / f.parent.name / f.name
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(f).convert("RGB").resize(size, Image.BILINEAR).save(out, quality=90)
    (dst / "done").touch()
    return dst


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(cfg: Config, info: DistInfo, steps: int, warmup: int) -> tuple[float, float]:
    """(img/s of the train step over `steps` after `warmup`, peak memory GiB)."""
    train, _, classes = build_loaders(cfg.data, info, seed=0, channels_last=cfg.model.channels_last)
    model, _ = build_model(cfg, len(classes), info)
    opt = build_optimizer(cfg.optim, model, cfg.data.batch_size)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.amp == "fp16")
    crit = nn.CrossEntropyLoss()
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train.set_epoch(0)
    batches = iter(train)
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            sync(info.device)
            t0 = time.perf_counter()
        images, labels = next(batches)
        with autocast(info.device, cfg.train.amp):
            loss = crit(model(images), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    sync(info.device)
    rate = steps * cfg.data.batch_size / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if info.device.type == "cuda" else float("nan")
    return rate, peak


def pipeline_rate(cfg: Config, info: DistInfo, steps: int, warmup: int) -> float:
    train, _, _ = build_loaders(cfg.data, info, seed=0, channels_last=cfg.model.channels_last)
    train.set_epoch(0)
    batches = iter(train)
    for i in range(warmup + steps):
        if i == warmup:
            sync(info.device)
            t0 = time.perf_counter()
        next(batches)
    sync(info.device)
    return steps * cfg.data.batch_size / (time.perf_counter() - t0)


def syncbn_check(info: DistInfo, batch: int, size: int) -> tuple[float, float, float]:
    """(max |torch SyncBN - cross-rank BN| over outputs and grads, ms/step plain BN, ms/step SyncBN)
    on a 1-rank process group: the reduction code path without a second GPU."""
    import torch.distributed as dist

    from train.sync_batchnorm import CrossRankBatchNorm2d

    if not dist.is_initialized():
        with tempfile.NamedTemporaryFile() as f:
            backend = "nccl" if info.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"file://{f.name}", rank=0, world_size=1)
    x = torch.randn(batch, 64, size, size, device=info.device, requires_grad=True)
    outs = []
    for bn in (nn.SyncBatchNorm(64), CrossRankBatchNorm2d(64)):
        if info.device.type != "cuda" and isinstance(bn, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(64)  # torch's SyncBN refuses CPU tensors; compare with plain BN
        bn = bn.to(info.device)
        y = bn(x)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        outs.append((y.detach(), g))
    diff = max((a - b).abs().max().item() for a, b in zip(outs[0], outs[1]))
    times = []
    for bn in (nn.BatchNorm2d(64), nn.SyncBatchNorm(64) if info.device.type == "cuda" else CrossRankBatchNorm2d(64)):
        bn = bn.to(info.device)
        for i in range(13):
            if i == 3:
                sync(info.device)
                t0 = time.perf_counter()
            bn(x).sum().backward()
        sync(info.device)
        times.append((time.perf_counter() - t0) / 10 * 1000)
    return diff, times[0], times[1]


def amp_check(cfg: Config, info: DistInfo, steps: int) -> dict[str, float]:
    """Final loss after `steps` on one fixed batch for fp32, bf16 and (CUDA) fp16 from one init."""
    torch.manual_seed(0)
    base, _ = build_model(replace(cfg, model=replace(cfg.model, compile=False)), 10, info)
    init = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.data.batch_size, 3, cfg.data.train_crop, cfg.data.train_crop, generator=g).to(info.device)
    y = torch.randint(0, 10, (cfg.data.batch_size,), generator=g).to(info.device)
    out = {}
    for amp in ("off", "bf16", "fp16") if info.device.type == "cuda" else ("off", "bf16"):
        base.load_state_dict(init)
        opt = build_optimizer(replace(cfg.optim, lr=0.05), base, cfg.data.batch_size)
        scaler = torch.amp.GradScaler(info.device.type, enabled=amp == "fp16")
        for _ in range(steps):
            with autocast(info.device, amp):
                loss = nn.functional.cross_entropy(base(x).float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        out[amp] = loss.item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--amp", default="fp16")
    p.add_argument("--demo", default=str(ROOT / "datasets/fashion-mnist"), help="source JPEG folders")
    p.add_argument("--jpegs", default="/tmp/imagenet-like", help="where the upscaled copy goes")
    p.add_argument("--loaders", default="synthetic,dali,torch")
    args = p.parse_args()
    print(machine_header(torch.device(args.device)))

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA GPU visible (use --device cpu for a smoke run)")
    torch.backends.cudnn.benchmark = True
    info = DistInfo(0, 1, 0, torch.device("cuda", 0) if device.type == "cuda" else device)
    amp = args.amp if device.type == "cuda" else ("bf16" if args.amp != "off" else "off")
    count = (args.warmup + args.steps) * args.batch + args.batch
    root = imagenet_like(Path(args.demo), Path(args.jpegs), count)
    cfg = Config()
    cfg.data = replace(cfg.data, root=str(root), batch_size=args.batch, train_crop=args.size,
                       val_resize=args.size * 8 // 7, val_crop=args.size, workers=min(16, os.cpu_count() or 1))
    cfg.model = replace(cfg.model, name=args.model, sync_bn=False)
    cfg.train = replace(cfg.train, amp=amp)
    rows = []
    for loader in args.loaders.split(","):
        for compiled in (False, True):
            c = replace(cfg, data=replace(cfg.data, loader=loader), model=replace(cfg.model, compile=compiled))
            try:
                rate, peak = step_rate(c, info, args.steps, args.warmup)
                rows.append((f"train step, {loader}{', compiled' if compiled else ''}", f"{rate:8.0f} img/s",
                             f"peak {peak:.1f} GiB"))
            except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
                rows.append((f"train step, {loader}{', compiled' if compiled else ''}", "failed",
                             f"{type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"))
    for loader in ("dali", "torch"):
        if loader in args.loaders:
            c = replace(cfg, data=replace(cfg.data, loader=loader))
            rate = pipeline_rate(c, info, args.steps, args.warmup)
            rows.append((f"input pipeline alone, {loader}", f"{rate:8.0f} img/s", ""))
    diff, t_bn, t_sync = syncbn_check(info, min(args.batch, 64), max(8, args.size // 4))
    rows.append(("SyncBN vs cross-rank BN (max abs diff)", f"{diff:.2e}", "outputs and input grads"))
    rows.append(("BN fwd+bwd ms: plain / sync (1 rank)", f"{t_bn:.2f} / {t_sync:.2f}", f"+{t_sync - t_bn:.2f} ms"))
    losses = amp_check(replace(cfg, data=replace(cfg.data, batch_size=min(args.batch, 64))), info, 50)
    for k, v in losses.items():
        rows.append((f"loss after 50 steps, amp {k}", f"{v:.4f}", f"vs fp32 {v - losses['off']:+.4f}"))
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"\n{args.model}, batch {args.batch}, {args.size}px, amp {amp}, channels_last, {name}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>14}  {r[2]}")


if __name__ == "__main__":
    main()
