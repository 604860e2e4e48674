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


@pytest.mark.parametrize("bias, decayed", [(None, "conv.weight fc.weight"),
                                           (True, "conv.weight conv.bias fc.weight fc.bias"),
                                           (False, "conv.weight fc.weight")])
def test_norms_and_biases_decay_apart(bias, decayed):
    """torchvision's v2 recipe (--norm-weight-decay 0.0) decays biases but not norms: bias=True."""
    model = torch.nn.Sequential()
    model.add_module("conv", torch.nn.Conv2d(3, 4, 3))
    model.add_module("bn", torch.nn.BatchNorm2d(4))
    model.add_module("ln", torch.nn.GroupNorm(2, 4))
    model.add_module("fc", torch.nn.Linear(4, 2))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 1e-4, bn_weight_decay=False, bias_weight_decay=bias)
    assert " ".join(names[id(p)] for p in groups[0]["params"]) == decayed
    assert {names[id(p)] for g in groups for p in g["params"]} == set(names.values())
    assert groups[1]["weight_decay"] == 0.0 and {"bn.weight", "bn.bias", "ln.weight", "ln.bias"} <= {
        names[id(p)] for p in groups[1]["params"]}
    both = param_groups(model, 1e-4, bn_weight_decay=True, bias_weight_decay=False)
    assert sorted(names[id(p)] for p in both[1]["params"]) == ["conv.bias", "fc.bias"]


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


def one_param_step(name, w0, g, wd, bn=False, **kw):
    """One step of `optim.name` on a single parameter, in the decayed group (or the BN/bias group)."""
    model = torch.nn.Linear(len(w0), 1, bias=False) if not bn else torch.nn.BatchNorm1d(len(w0))
    opt = build_optimizer(OptimConfig(name=name, lr=0.5, lr_reference_batch=256, weight_decay=wd, **kw), model, 256)
    p = next(model.parameters())
    with torch.no_grad():
        p.copy_(w0.view_as(p))
    for q in model.parameters():
        q.grad = g.view_as(q).clone() if q is p else torch.zeros_like(q)
    opt.step()
    return p.detach().flatten()


def test_lars_is_timms_with_the_papers_trust_ratio():
    from timm.optim import Lars
    w, g, wd, lr, eta = torch.tensor([3.0, -4.0]), torch.tensor([0.6, 0.8]), 0.01, 0.5, 0.001
    assert isinstance(build_optimizer(OptimConfig(name="lars"), torch.nn.Linear(2, 2), 256), Lars)
    trust = eta * w.norm() / (g.norm() + wd * w.norm())  # You et al. 2017, Alg. 1; MLPerf's reference
    want = w - lr * trust * (g + wd * w)  # first step: the momentum buffer is the update itself
    torch.testing.assert_close(one_param_step("lars", w, g, wd, momentum=0.9), want)
    # BN and bias: no decay, no trust ratio, plain SGD
    torch.testing.assert_close(one_param_step("lars", w, g, wd, bn=True), w - lr * g)
    # weight_decay 0: the decayed group still gets its trust ratio (timm alone would skip it)
    torch.testing.assert_close(one_param_step("lars", w, g, 0.0), w - lr * eta * w.norm() / g.norm() * g)


def old_lars_update(w, g, lr, wd, eta=0.001):
    """The first step of the LARS train/optim.py had before timm's, for the comparison below:
    its trust ratio divided by |g + wd w|, so every update had length lr * eta * |w|."""
    d = g + wd * w
    return -lr * eta * w.norm() / d.norm() * d


def test_lars_differs_from_the_old_form_where_decay_and_gradient_cancel():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    lr, wd = 0.5, 5e-5
    # weight decay 0: the same step
    g = noise * 0.01
    torch.testing.assert_close(one_param_step("lars", w, g, 0.0) - w, old_lars_update(w, g, lr, 0.0))
    # early training, |g| >> wd |w|: |g + wd w| ~ |g| + wd |w|, the steps agree to ~wd |w| / |g|
    new, old = one_param_step("lars", w, g, wd) - w, old_lars_update(w, g, lr, wd)
    assert 0 < (new - old).norm() / old.norm() < 2 * wd * w.norm() / g.norm() < 0.02
    # near equilibrium, g ~ -wd w: the old form still stepped lr * eta * |w|; the paper's step shrinks
    g = -wd * w + 1e-3 * wd * noise
    new, old = one_param_step("lars", w, g, wd) - w, old_lars_update(w, g, lr, wd)
    torch.testing.assert_close(old.norm(), lr * 0.001 * w.norm())
    assert new.norm() < 0.01 * old.norm()


def test_lamb_is_timms_with_one_step_by_hand():
    from timm.optim import Lamb
    w, g, wd, lr = torch.tensor([3.0, -4.0]), torch.tensor([0.3, 0.4]), 0.02, 0.5
    assert isinstance(build_optimizer(OptimConfig(name="lamb"), torch.nn.Linear(2, 2), 256), Lamb)
    # step 1 of Adam with bias correction is g / (|g| + eps) elementwise; + L2 decay; trust |w| / |u|
    u = g / (g.abs() + 1e-6) + wd * w
    torch.testing.assert_close(one_param_step("lamb", w, g, wd), w - lr * w.norm() / u.norm() * u)
    # BN and bias: the Adam step without decay or trust ratio
    torch.testing.assert_close(one_param_step("lamb", w, g, wd, bn=True), w - lr * g / (g.abs() + 1e-6))
    # gradients above global norm 1 are scaled down inside the step (timm's default, RSB's)
    big = g * 10
    torch.testing.assert_close(one_param_step("lamb", w, big, wd), w - lr * w.norm() / u.norm() * u)


def test_lamb_and_lars_state_round_trips():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    for name in ("lars", "lamb"):
        opt = build_optimizer(OptimConfig(name=name, weight_decay=1e-4), model, 256)
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
        again = build_optimizer(OptimConfig(name=name, weight_decay=1e-4), model, 256)
        again.load_state_dict(opt.state_dict())
        assert again.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_fused_is_sgd_only():
    from train.config import ConfigError, load

    with pytest.raises(ConfigError, match="optim.implementation: fused is for sgd only"):
        load(None, ["optim.name=lamb", "optim.implementation=fused"], check_data=False)
