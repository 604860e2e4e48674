"""Optimizer and per-iteration learning-rate schedule.

The peak LR follows the linear scaling rule (Goyal et al. 2017, DLE): `lr * global_batch /
lr_reference_batch`. The schedule is a LambdaLR over *iterations* with linear warmup: one pure
function of the step, so its value at any step is testable and the scheduler's state is just the
step count. (Chaining LinearLR and CosineAnnealingLR with SequentialLR gives the same curve but
re-steps the inner scheduler at the boundary and is awkward to resume mid-epoch.)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def param_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool) -> list[dict]:
    """Decay conv/linear weights; BN parameters and biases (ndim <= 1) only if asked to."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 and not bn_weight_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


class LARS(torch.optim.Optimizer):
    """SGD with layer-wise trust ratios (You et al. 2017), as in MLPerf's ResNet-50 recipes.

    torch has no LARS; this is the MLPerf form: g += wd*w, g *= eta*|w|/|g| per tensor, then
    momentum. Groups flagged `lars_exclude` (BN, bias) take the plain SGD step.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if not group["lars_exclude"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g.mul_(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = g
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def peak_lr(cfg, global_batch: int) -> float:
    return cfg.lr * global_batch / cfg.lr_reference_batch


def build_optimizer(cfg, model: nn.Module, global_batch: int) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, cfg.bn_weight_decay)
    lr = peak_lr(cfg, global_batch)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
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
