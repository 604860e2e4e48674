"""Optimizer and per-iteration learning-rate schedule.

The peak LR follows the linear scaling rule (Goyal et al. 2017, DLE): `lr * global_batch /
lr_reference_batch`, with the global batch of the *current* run. The schedule is one pure function
of the fraction of training done, `progress = epoch + sample_in_epoch / epoch_samples` (epochs, a
float; `epoch_samples` = optimizer steps per epoch x global batch of the current run), not of the
step: warmup, step/multistep boundaries and cosine/poly progress all follow samples, so a resume on
another world size, per-rank batch or accumulation continues the same curve. `SampleLR` is a
LambdaLR driven by `set_progress(progress)` once per optimizer step; on load it keeps the current
run's base (peak) LRs and remembers the checkpoint's (`saved_peak`, `saved_global_batch`) so the
trainer can log the change. (Chaining LinearLR and CosineAnnealingLR with SequentialLR gives the
same curve but re-steps the inner scheduler at the boundary and is awkward to resume mid-epoch.)

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
import warnings

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# torchvision's set_weight_decay tells norm parameters by their module, as here
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, bn_weight_decay: bool,
                 bias_weight_decay: bool | None = None) -> list[dict]:
    """Decay conv/linear weights; norm-layer parameters only if `bn_weight_decay`, the other biases
    only if `bias_weight_decay` (None: as `bn_weight_decay`, DLE's rule; torchvision's v2 recipe
    decays the fc bias but not the norms). The undecayed group is flagged `lars_exclude`: LARS and
    LAMB give it no layer-wise trust ratio either (MLPerf, timm)."""
    bias_weight_decay = bn_weight_decay if bias_weight_decay is None else bias_weight_decay
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            keep = bn_weight_decay if isinstance(module, _NORMS) else bias_weight_decay if name == "bias" else True
            (decay if keep else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def peak_lr(cfg, global_batch: int) -> float:
    return cfg.lr * global_batch / cfg.lr_reference_batch


def build_optimizer(cfg, model: nn.Module, global_batch: int) -> torch.optim.Optimizer:
    """`optim.name`: sgd (torch), lars or lamb (timm.optim, see the module docstring)."""
    groups = param_groups(model, cfg.weight_decay, cfg.bn_weight_decay,
                          {"as_bn": None, "on": True, "off": False}[cfg.bias_weight_decay])
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


def lr_factor(progress: float, sched, epochs: int) -> float:
    """Multiplier of the peak LR after `progress` epochs of training (a float: 2.5 = half-way
    through the third epoch)."""
    warmup = sched.warmup_epochs
    if progress < warmup:
        s = sched.warmup_start_factor
        return s + (1 - s) * progress / warmup
    if sched.name == "constant":
        return 1.0
    eps = 1e-9  # a boundary reached by a sum of global batches is reached, not missed by rounding
    if sched.name == "step":
        return sched.gamma ** int((progress + eps) // sched.step_size)
    if sched.name == "multistep":
        return sched.gamma ** sum(progress + eps >= m for m in sched.milestones)
    total = max(1e-12, epochs - warmup)  # cosine/poly from the end of warmup to 0 (+floor)
    t = min(1.0, (progress - warmup) / total)
    if sched.name == "poly":
        return sched.min_lr_factor + (1 - sched.min_lr_factor) * (1 - t) ** sched.power
    return sched.min_lr_factor + (1 - sched.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))


class SampleLR(LambdaLR):
    """A LambdaLR whose factor is `lr_factor(self.progress)`: the trainer calls
    `set_progress(epoch + sample_in_epoch / epoch_samples)` after every optimizer step and after
    a resume. Until the first `set_progress`, a plain `step()` advances by one step of
    `steps_per_epoch` (benchmarks). `last_epoch` counts the scheduler steps of this process.

    `load_state_dict` restores the rest but keeps this run's base LRs (the peak for the current
    global batch); the checkpoint's peak and global batch are kept in `saved_peak` and
    `saved_global_batch` (None if the checkpoint did not say)."""

    def __init__(self, optimizer: torch.optim.Optimizer, sched, steps_per_epoch: int, epochs: int,
                 global_batch: int = 0):
        self.progress: float | None = None
        self.steps_per_epoch, self.global_batch = steps_per_epoch, global_batch
        self.saved_peak: float | None = None
        self.saved_global_batch: int | None = None
        super().__init__(optimizer, lambda step: lr_factor(
            step / self.steps_per_epoch if self.progress is None else self.progress, sched, epochs))

    def set_progress(self, progress: float) -> None:
        """Move every group's LR to the curve's value after `progress` epochs."""
        self.progress = progress
        with warnings.catch_warnings():  # after a resume it runs before the first optimizer.step()
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.step()

    def state_dict(self) -> dict:
        state = super().state_dict()
        for name in ("saved_peak", "saved_global_batch"):
            state.pop(name, None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        keep = list(self.base_lrs), self.global_batch, self.steps_per_epoch
        super().load_state_dict(state_dict)
        self.saved_peak = float(state_dict["base_lrs"][0]) if state_dict.get("base_lrs") else None
        self.saved_global_batch = int(state_dict["global_batch"]) if state_dict.get("global_batch") else None
        self.base_lrs, self.global_batch, self.steps_per_epoch = keep


def build_scheduler(sched, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int,
                    global_batch: int = 0) -> SampleLR:
    """`steps_per_epoch` only serves plain `step()` calls; the trainer drives `set_progress`."""
    return SampleLR(optimizer, sched, steps_per_epoch, epochs, global_batch)
