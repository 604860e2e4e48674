"""Every speed switch keeps the numbers of the plain path: channels_last, bf16 autocast,
torch.compile (graph capture, whole model), SGD implementations, DDP tuning; and a synthetic run
of a config is the same run as the real one except for the pixels."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from data import build_loaders
from tests.distributed_helpers import run_ranks
from train.config import Config, DataConfig, DistConfig, ModelConfig, OptimConfig
from train.distributed import DistInfo
from train.optim import build_optimizer, build_scheduler
from train.trainer import autocast, build_model

CPU = torch.device("cpu")


def train_steps(model_cfg: ModelConfig, optim_cfg: OptimConfig | None = None, amp: str = "off",
                steps: int = 3, compile_backend: str | None = None):
    """Losses of `steps` SGD steps on fixed random batches from a fixed init, and the final weights."""
    optim_cfg = optim_cfg or OptimConfig(lr=0.1)
    torch.manual_seed(0)
    cfg = Config(model=model_cfg, optim=optim_cfg)
    model, bare = build_model(cfg, 10, DistInfo(0, 1, 0, CPU))
    if compile_backend:
        model = torch.compile(model, backend=compile_backend, fullgraph=True)
    opt = build_optimizer(optim_cfg, model, 32)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
        if model_cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(CPU, amp):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in bare.state_dict().items()}


BASE = ModelConfig(name="resnet20", stem="cifar", channels_last=False, sync_bn=False)


def assert_weights_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=rtol, atol=atol, msg=k)


def test_channels_last_matches_nchw():
    l1, w1 = train_steps(BASE)
    l2, w2 = train_steps(replace(BASE, channels_last=True))
    assert l2 == pytest.approx(l1, rel=1e-4)
    assert_weights_close(w1, w2, rtol=1e-3, atol=1e-4)


def test_bf16_autocast_tracks_fp32():
    l32, _ = train_steps(BASE, steps=6)
    l16, _ = train_steps(BASE, amp="bf16", steps=6)
    assert l16[0] == pytest.approx(l32[0], rel=2e-2)  # one forward: bf16 rounding only
    assert abs(l16[-1] - l32[-1]) < 0.05 * l32[0]
    assert l16[-1] < l16[0]


def test_compiled_whole_graph_matches_eager():
    """fullgraph=True: the model compiles without a graph break; aot_eager runs the captured
    forward and backward graphs with eager kernels (no C++ compiler needed on the test machine)."""
    le, we = train_steps(BASE)
    lc, wc = train_steps(BASE, compile_backend="aot_eager")
    assert lc == pytest.approx(le, rel=1e-5)
    assert_weights_close(we, wc, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "for-loop"])
def test_sgd_implementations_agree(impl):
    _, ref = train_steps(BASE, OptimConfig(lr=0.1, nesterov=True, implementation="foreach"))
    _, got = train_steps(BASE, OptimConfig(lr=0.1, nesterov=True, implementation=impl))
    assert_weights_close(ref, got, rtol=1e-5, atol=1e-6)


def _ddp(rank, world, dist_cfg):
    cfg_model = BASE
    half = slice(rank * 16, (rank + 1) * 16)
    torch.manual_seed(0)
    cfg = Config(model=cfg_model, dist=dist_cfg)
    info = DistInfo(rank, world, rank, CPU)
    model, bare = build_model(cfg, 10, info)
    opt = build_optimizer(OptimConfig(lr=0.1), model, 32)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(32, 3, 32, 32, generator=g)[half]
        y = torch.randint(0, 10, (32,), generator=g)[half]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    # numpy: tensors sent through the result queue would share memory with an exited process
    return {k: v.detach().numpy().copy() for k, v in bare.state_dict().items() if v.is_floating_point()}


def test_ddp_tuning_switches_keep_the_weights():
    plain = run_ranks(_ddp, 2, DistConfig(gradient_as_bucket_view=False, static_graph=False, bucket_cap_mb=25))
    tuned = run_ranks(_ddp, 2, DistConfig(gradient_as_bucket_view=True, static_graph=True, bucket_cap_mb=1))
    for a, b in zip(plain, tuned):
        for k in a:
            if "running" not in k:  # BN statistics are per rank without SyncBN
                torch.testing.assert_close(torch.from_numpy(a[k]), torch.from_numpy(b[k]), rtol=1e-5, atol=1e-6,
                                           msg=k)


def test_synthetic_run_is_the_same_run_as_real(tiny_data):
    """Same model, classes, epoch length and LR curve; only the pixels differ. The initial loss
    of both is ~ln(classes) (zero-init residuals, random head)."""
    out = {}
    for loader in ("torch", "synthetic"):
        data = DataConfig(root=str(tiny_data), loader=loader, batch_size=8, workers=0, train_crop=32,
                          val_resize=32, val_crop=32)
        train, _, classes = build_loaders(data, DistInfo(0, 1, 0, CPU), seed=0, channels_last=False)
        cfg = Config(data=data, model=BASE)
        torch.manual_seed(0)
        model, _ = build_model(cfg, len(classes), DistInfo(0, 1, 0, CPU))
        opt = build_optimizer(cfg.optim, model, 8)
        sched = build_scheduler(cfg.schedule, opt, train.steps_per_epoch, 2)
        train.set_epoch(0)
        images, labels = next(iter(train))
        with torch.no_grad():
            loss = nn.functional.cross_entropy(model(images), labels).item()
        lrs = []
        for _ in range(2 * train.steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        out[loader] = (classes, train.steps_per_epoch, train.num_samples, shapes, lrs, loss, tuple(images.shape))
    real, syn = out["torch"], out["synthetic"]
    assert syn[:5] == real[:5] and syn[6] == real[6]
    for r in (real, syn):
        assert r[5] == pytest.approx(math.log(len(r[0])), rel=0.15)
