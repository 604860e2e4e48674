"""Checks only a GPU can make: `pytest -m gpu` (skipped where no CUDA GPU is visible: conftest.py).
benchmarks/gpu.py runs them on a lent machine and prints their result in its table. Each asserts
a number against a stated tolerance:

- DALI's GPU pipeline (nvJPEG + hardware decoder, GPU resize) against its CPU pipeline on the
  same files and seeds: the same samples, labels and crop/flip draws (DALI seeds both from the
  operator seed and the sample index: random_crop_attr.h), pixels within decoder rounding:
  mean |diff| <= 2 and 99th percentile <= 16 grey levels of 255 (a different crop or flip is
  tens of levels on average);
- torch's SyncBatchNorm and our cross-rank BN (train/sync_batchnorm.py), 2 ranks on halves of a
  batch, against plain BN on the whole batch: outputs, gradients and running statistics within 1e-4;
- bf16 and fp16 (GradScaler) losses against fp32 (TF32 off) over 50 SGD steps from one init:
  max |diff| <= 0.05 nats (bf16 on this repo's Xeon AMX: 7e-4);
- a run resumed from an async mid-epoch checkpoint of CUDA tensors equals the uninterrupted run
  bit for bit in deterministic mode (DALI's GPU loader where installed, else the torch loader:
  one loader each, to keep the acceptance call short);
- no host sync between two metric flushes of the real step loop (EMA, MixUp/CutMix, accumulate 2),
  counted by CUDA's own sync debug mode;
- `dist.device=cpu` on a GPU machine creates no CUDA context (torch.cuda.is_initialized() is
  False, and nvidia-smi lists no compute context for the process).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from benchmarks.gpu import count_syncs, make_jpegs, syncbn_agreement
from tests.conftest import ROOT, run_trainer, write_config
from tests.distributed_helpers import run_ranks
from train.export import model_state_dict

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def loader() -> str:
    """DALI (GPU decoding) where installed, else the torch loader."""
    try:
        import nvidia.dali  # noqa: F401
        return "dali"
    except ImportError:
        return "torch"


def dali_batches(root, where: str, device: torch.device) -> list:
    """The first train epoch and the val pass of DALI on `where` (gpu | cpu) for `root`, seed 0:
    [(images on the 0..255 scale on the CPU, labels, sample indices)]."""
    from data import dali, folder
    from train.config import DataConfig
    from train.distributed import DistInfo

    cfg = DataConfig(root=str(root), loader="dali", dali_device=where, batch_size=8, workers=2, train_crop=224,
                     val_resize=256, val_crop=224)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in folder.normalisation(cfg))
    train, val, _ = dali.build(cfg, DistInfo(0, 1, 0, device), seed=0, channels_last=False)
    train.set_epoch(0)
    try:
        return [(x.float().cpu() * std + mean, y.cpu(), list(i)) for x, y, i in
                (*train.iter_indexed(), *val.iter_indexed())]
    finally:
        train.close()
        val.close()


def pixel_diff(a: list, b: list) -> tuple[float, float]:
    """(mean, 99th percentile) of |a - b| in grey levels; the samples and labels must be equal."""
    assert len(a) == len(b)
    diffs = []
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert ia == ib and torch.equal(ya, yb)
        diffs.append((xa - xb).abs().flatten())
    d = torch.cat(diffs)
    return d.mean().item(), d.quantile(0.99).item()  # 36 images of 3 x 224 x 224: under quantile's 2**24


def test_dali_gpu_pipeline_matches_cpu_pipeline(tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    make_jpegs(tmp_path / "jpegs", "imagenet", classes=3, train_per_class=8, val_per_class=4)
    gpu, cpu = (dali_batches(tmp_path / "jpegs", where, CUDA) for where in ("gpu", "cpu"))
    assert len(gpu) == 3 + 2  # 24 train images in batches of 8, 12 val
    mean_diff, p99 = pixel_diff(gpu, cpu)
    assert mean_diff <= 2.0 and p99 <= 16.0, f"GPU vs CPU pixels: mean |diff| {mean_diff:.2f}, p99 {p99:.1f}"


def _syncbn(rank, world):
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return syncbn_agreement(rank, world, device)


def test_torch_syncbn_and_cross_rank_bn_equal_plain_bn_on_the_whole_batch():
    diffs = run_ranks(_syncbn, 2)[0]  # gloo: two processes may share one GPU (NCCL refuses that)
    assert set(diffs) == {"torch", "ours"}
    assert max(diffs.values()) <= 1e-4, diffs


def amp_losses(amp: str, device: torch.device = CUDA, steps: int = 50) -> torch.Tensor:
    """Losses of `steps` SGD steps of resnet20 on one learnable batch (class prototypes + noise)."""
    from train import models
    from train.config import ModelConfig
    from train.trainer import autocast

    torch.manual_seed(0)
    model = models.build(ModelConfig(name="resnet20", stem="cifar"), 10).to(device, memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (64,), generator=g)
    x = torch.randn(64, 3, 32, 32, generator=g) + torch.randn(10, 3, 32, 32, generator=g)[y]
    x, y = x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    losses = []
    for _ in range(steps):
        with autocast(device, amp):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach())
    return torch.stack(losses).cpu()


def test_bf16_and_fp16_losses_track_fp32_over_50_steps(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ref = amp_losses("off")
    assert ref[-1] < 0.9 * ref[0]  # it learns
    for amp in ("bf16", "fp16"):
        diff = (amp_losses(amp) - ref).abs().max().item()
        assert diff <= 0.05, f"{amp}: max |loss - fp32 loss| {diff:.4f} over 50 steps"


def test_resume_from_async_checkpoint_is_bitwise_on_gpu(tmp_path, tiny_data, loader):
    cfg = write_config(tmp_path, tiny_data)  # deterministic: true
    common = ["dist.device=cuda", "train.amp=bf16", f"data.loader={loader}", "checkpoint.async_save=true",
              "data.workers=2"]
    run_trainer(cfg, *common, "log.name=full")
    run_trainer(cfg, *common, "log.name=cut", "train.max_steps=11")  # 8 steps an epoch: mid-epoch 2
    r = run_trainer(cfg, *common, "log.name=cut")
    assert "resumed from" in r.stdout and "step 11," in r.stdout
    full, cut = model_state_dict(tmp_path / "runs/full"), model_state_dict(tmp_path / "runs/cut")
    assert full.keys() == cut.keys()
    unequal = [k for k in full if not torch.equal(full[k], cut[k])]
    assert unequal == [], f"{len(unequal)} of {len(full)} tensors differ, e.g. {unequal[:3]}"


def sync_config(tmp_path, data, loader: str, device: str, amp: str = "bf16"):
    """The tiny recipe with EMA, MixUp/CutMix and 2 micro-batches per step, for count_syncs."""
    from train import config as config_lib

    return config_lib.load(str(write_config(tmp_path, data)), [
        f"data.loader={loader}", f"dist.device={device}", f"train.amp={amp}", "train.deterministic=false",
        "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0", "optim.ema_decay=0.999", "optim.accumulate=2",
        "data.batch_size=4", "log.tensorboard=false", "log.progress=off", "train.resume=off"])


def test_no_host_sync_between_flushes_on_gpu(tmp_path, tiny_data, loader, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    in_step, in_flush = count_syncs(sync_config(tmp_path, tiny_data, loader, "cuda"), CUDA, window=3)
    assert in_step == [], f"{len(in_step)} host syncs in 3 steps: {in_step[:5]}"
    assert 1 <= len(in_flush) <= 3  # the flush's reduction: the loop's one intended sync


def cuda_state_after_cpu_run(tmp_path, data) -> dict:
    """A 2-step run with dist.device=cpu and an async checkpoint, in a fresh process: whether torch
    initialised CUDA in it, and how many compute contexts nvidia-smi lists for it (None: no nvidia-smi)."""
    cfg = write_config(tmp_path, data)
    code = f"""
import json, os, subprocess, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from train.main import main
main(['--config', {str(cfg)!r}, 'dist.device=cpu', 'train.max_steps=2', 'log.name=cpu', 'data.workers=2',
      'checkpoint.async_save=true'])
try:
    out = subprocess.run(['nvidia-smi', '--query-compute-apps=pid', '--format=csv,noheader'], capture_output=True,
                         text=True, timeout=60).stdout
    contexts = [int(p) for p in out.split() if p.strip().isdigit()].count(os.getpid())
except OSError:
    contexts = None
print('RESULT', json.dumps({{'initialized': torch.cuda.is_initialized(), 'contexts': contexts}}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.rsplit("RESULT", 1)[1])


def test_dist_device_cpu_creates_no_cuda_context(tmp_path, tiny_data):
    result = cuda_state_after_cpu_run(tmp_path, tiny_data)
    assert result["initialized"] is False and result["contexts"] in (0, None), result  # None: no nvidia-smi
