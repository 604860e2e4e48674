"""Optimizer and per-iteration learning-rate schedule.

The peak LR follows the linear scaling rule (Goyal et al. 2017, DLE): `lr * global_batch /
lr_reference_batch`. The schedule is a LambdaLR over *iterations* with linear warmup: one pure
function of the step, so its value at any step is testable and the scheduler's state is just the
step count. (Chaining LinearLR and CosineAnnealingLR with SequentialLR gives the same curve but
re-steps the inner scheduler at the boundary and is awkward to resume mid-epoch.)

LARS and LAMB are timm's (`timm.optim.Lars`, `timm.optim.Lamb`), not in torch:
- LARS (You et al. 2017): trust ratio eta * |w| / (|g| + wd * |w| + eps), eta = 0.001, on the
  decayed group only, then SGD momentum. That denominator is the paper's (Algorithm 1), MLPerf's
  TensorFlow reference and NVIDIA apex's LARC. The LARS this project had until now divided by
  |g + wd * w| instead, which made every step exactly lr * eta * |w| long: equal to timm's at
  weight_decay 0, within ~wd |w| / |g| of it early in training, but where the gradient and the
  decay cancel (late training) it kept stepping at full length where the paper's step shrinks
  (tests/test_optim.py shows both). No source uses that form, so timm's replaced it.
- LAMB (You et al. 2019) with timm's defaults, as timm's `--opt lamb` in "ResNet strikes back":
  betas (0.9, 0.999), eps 1e-6, L2 decay folded into the Adam update, trust ratio |w| / |update|
  on the decayed group, and the gradients scaled to global norm <= 1 inside the step
  (`max_grad_norm=1.0`; `optim.grad_clip` clips before it, on top). `optim.momentum` is unused.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def param_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool) -> list[dict]:
    """Decay conv/linear weights; BN parameters and biases (ndim <= 1) only if asked to. The
    undecayed group is flagged `lars_exclude`: LARS and LAMB give it no layer-wise trust ratio
    either (MLPerf, timm)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 and not bn_weight_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def peak_lr(cfg, global_batch: int) -> float:
    return cfg.lr * global_batch / cfg.lr_reference_batch


def build_optimizer(cfg, model: nn.Module, global_batch: int) -> torch.optim.Optimizer:
    """`optim.name`: sgd (torch), lars or lamb (timm.optim, see the module docstring)."""
    groups = param_groups(model, cfg.weight_decay, cfg.bn_weight_decay)
    lr = peak_lr(cfg, global_batch)
    if cfg.name in ("lars", "lamb"):
        from timm.optim import Lamb, Lars

        for g in groups:  # trust ratio on the decayed group even at weight_decay 0 (timm: only if decayed)
            g["always_adapt"] = not g.pop("lars_exclude", False)
        foreach = cfg.implementation == "foreach"
        if cfg.name == "lars":
            return Lars(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                        trust_coeff=0.001, foreach=foreach)
        return Lamb(groups, lr=lr, weight_decay=cfg.weight_decay, foreach=foreach)
    for g in groups:
        g.pop("lars_exclude", None)
    impl = {"foreach": dict(foreach=True), "fused": dict(fused=True), "for-loop": dict(foreach=False)}
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, **impl[cfg.implementation])


def lr_factor(step: int, sched, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the peak LR at iteration `step` (0-based)."""
    warmup = round(sched.warmup_epochs * steps_per_epoch)
    if step < warmup:
        s = sched.warmup_start_factor
        return s + (1 - s) * step / warmup
    epoch = step / steps_per_epoch
    if sched.name == "constant":
        return 1.0
    if sched.name == "step":
        return sched.gamma ** int(epoch // sched.step_size)
    if sched.name == "multistep":
        return sched.gamma ** sum(epoch >= m for m in sched.milestones)
    total = max(1, epochs * steps_per_epoch - warmup)  # cosine/poly from the end of warmup to 0 (+floor)
    progress = min(1.0, (step - warmup) / total)
    if sched.name == "poly":
        return sched.min_lr_factor + (1 - sched.min_lr_factor) * (1 - progress) ** sched.power
    return sched.min_lr_factor + (1 - sched.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(sched, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, sched, steps_per_epoch, epochs))
