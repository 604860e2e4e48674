"""Training losses: `build_criterion(cfg.optim)` → a module `(logits [N, C], targets) -> scalar`.

`targets` is either hard labels (int64 [N]) or soft targets (float [N, C], rows summing to 1,
e.g. the output of MixUp/CutMix on one-hot labels). Label smoothing (`optim.label_smoothing`, s)
is applied here to both kinds, t -> (1 - s) t + s / C: for hard labels that is the one-hot target
torch's and timm's losses build, and since it is affine with weights summing to 1 it commutes with
mixing, so smoothing the mix here equals timm's Mixup smoothing each label before mixing (and is
what torchvision's reference does: v2.MixUp/CutMix, then CrossEntropyLoss(label_smoothing)).
Callers pass *unsmoothed* soft targets.

- `ce`: softmax cross-entropy, the mean over the batch (torch's nn.CrossEntropyLoss).
- `bce`: binary cross-entropy with logits on every class, as timm's BinaryCrossEntropy used by
  "ResNet strikes back" (Wightman et al. 2021): the mean over batch and classes by default (timm's
  default, the one RSB ran with), or with `optim.bce_sum` the sum over classes and mean over the
  batch (timm's `--bce-sum`, C times larger); `optim.bce_target_threshold` > 0 makes every target
  above it 1 and the rest 0 (timm's `--bce-target-thresh`, after smoothing as in timm).

Both compute in float32 whatever the autocast dtype of the logits (torch's cross-entropy does so
under autocast anyway), so the loss of a bf16 or fp16 forward is that of its float32 upcast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def smooth_targets(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Float [N, C] targets from hard labels or soft targets, label-smoothed."""
    if targets.is_floating_point():
        if targets.shape[-1] != num_classes:
            raise ValueError(f"soft targets of shape {tuple(targets.shape)} for {num_classes} classes")
        t = targets.float()
    else:
        t = F.one_hot(targets.long(), num_classes).float()
    return t * (1.0 - smoothing) + smoothing / num_classes if smoothing else t


class CrossEntropy(nn.Module):
    def __init__(self, smoothing: float = 0.0):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point():  # torch smooths probability targets the same way
            targets = targets.float()
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.smoothing)


class BinaryCrossEntropy(nn.Module):
    def __init__(self, smoothing: float = 0.0, target_threshold: float = 0.0, sum_classes: bool = False):
        super().__init__()
        self.smoothing, self.target_threshold, self.sum_classes = smoothing, target_threshold, sum_classes

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        t = smooth_targets(targets, logits.shape[-1], self.smoothing)
        if self.target_threshold:
            t = (t > self.target_threshold).float()
        if self.sum_classes:
            return F.binary_cross_entropy_with_logits(logits, t, reduction="none").sum(-1).mean()
        return F.binary_cross_entropy_with_logits(logits, t)


def build_criterion(cfg) -> nn.Module:
    """The training loss of the `optim` config section (see the module docstring)."""
    if cfg.loss == "bce":
        return BinaryCrossEntropy(cfg.label_smoothing, cfg.bce_target_threshold, cfg.bce_sum)
    return CrossEntropy(cfg.label_smoothing)
