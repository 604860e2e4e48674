"""Schedules give the documented LR at chosen steps; linear scaling; no decay on BN/bias."""

import math

import pytest
import torch

from train.config import OptimConfig, ScheduleConfig
from train.optim import build_optimizer, build_scheduler, param_groups, peak_lr


def lrs(sched: ScheduleConfig, steps_per_epoch=10, epochs=10, lr=0.1, batch=512):
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(OptimConfig(lr=lr), model, batch)
    s = build_scheduler(sched, opt, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    return out


def test_linear_scaling():
    assert peak_lr(OptimConfig(lr=0.256), 2048) == pytest.approx(2.048)


def test_warmup_then_cosine():
    out = lrs(ScheduleConfig(name="cosine", warmup_epochs=2, warmup_start_factor=0.1))
    peak = 0.2  # 0.1 * 512 / 256
    assert out[0] == pytest.approx(0.1 * peak)
    assert out[10] == pytest.approx(peak * (0.1 + 0.9 * 10 / 20))
    assert out[20] == pytest.approx(peak)  # warmup end
    assert out[20 + 40] == pytest.approx(peak * 0.5)  # half-way through the cosine
    assert out[-1] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 79 / 80)))


def test_step_and_multistep():
    out = lrs(ScheduleConfig(name="step", step_size=3, gamma=0.1))
    assert out[29] == pytest.approx(0.2) and out[30] == pytest.approx(0.02) and out[60] == pytest.approx(0.002)
    out = lrs(ScheduleConfig(name="multistep", milestones=[5, 8], gamma=0.5, warmup_epochs=1))
    assert out[0] == pytest.approx(0.02) and out[10] == pytest.approx(0.2)
    assert out[49] == pytest.approx(0.2) and out[50] == pytest.approx(0.1) and out[80] == pytest.approx(0.05)


def test_no_weight_decay_on_bn_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    decay, no_decay = param_groups(model, 1e-4, bn_weight_decay=False)
    assert [p.ndim for p in decay["params"]] == [4, 2]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    assert len(param_groups(model, 1e-4, bn_weight_decay=True)) == 1


def test_lars_trust_ratio():
    w = torch.nn.Parameter(torch.ones(4) * 2)
    opt = build_optimizer(OptimConfig(name="lars", lr=1.0, momentum=0.0, weight_decay=0.0), torch.nn.Linear(1, 1), 256)
    opt.param_groups[0]["params"] = [w]
    w.grad = torch.ones(4)
    opt.step()
    # update = lr * eta * |w| / |g| * g = 0.001 * 4 / 2 * 1
    assert torch.allclose(w, torch.full((4,), 2 - 0.002))


def test_poly_after_warmup():
    out = lrs(ScheduleConfig(name="poly", warmup_epochs=2, warmup_start_factor=0.0, power=2.0))
    peak = 0.2
    assert out[0] == 0.0 and out[20] == pytest.approx(peak)
    assert out[20 + 40] == pytest.approx(peak * 0.25)  # (1 - 1/2) ** 2 half-way
    assert out[-1] == pytest.approx(peak * (1 / 80) ** 2)
