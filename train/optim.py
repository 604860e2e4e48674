"""What a step optimises: the loss, the optimizer and its LR schedule, the weight EMA.

Loss (`build_criterion(cfg.optim)`: `(logits [N, C], targets) -> scalar`). `targets` are hard
labels (int64 [N]) or unsmoothed soft targets (float [N, C], e.g. MixUp/CutMix of one-hot labels).
Label smoothing s maps both to (1 - s) t + s / C here; it is affine with weights summing to 1, so it
commutes with mixing: smoothing the mix equals timm's Mixup smoothing each label before mixing, and
torchvision's reference (v2.MixUp/CutMix, then CrossEntropyLoss(label_smoothing)). `ce` is torch's
softmax cross-entropy, mean over the batch. `bce` is timm's BinaryCrossEntropy of "ResNet strikes
back" (Wightman et al. 2021): the mean over batch and classes (timm's default, RSB's), with
`optim.bce_sum` the sum over classes (timm's `--bce-sum`, C times larger), with
`optim.bce_target_threshold` > 0 targets above it set to 1 and the rest 0 after smoothing (timm's
`--bce-target-thresh`). Both compute in float32 whatever the autocast dtype of the logits.

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

Weight EMA (`optim.ema_decay` per optimizer step, updated every `optim.ema_every` = k steps with
decay ** k, so the average spans the same steps whatever k): `AveragedModel` with
`get_ema_multi_avg_fn` and `use_buffers=True`, as torchvision's reference
(references/classification/utils.py `ExponentialMovingAverage`), so BN running statistics are
averaged too, and during the LR warmup the EMA restarts as a copy of the weights after every
update (torchvision's train.py). torchvision states its decay per "adjust" (`world_size *
batch_size * model_ema_steps / epochs`); `torchvision_decay_per_step` converts it into ours
(configs/imagenet_resnet50_tv2.yaml). It is evaluated as `val_ema/*`, saved as the named state
"ema" (`train.export --ema`, `train.evaluate --ema`, `checkpoint.best_by: val_ema`). Resume is
exact: the update happens after the optimizer step at global steps divisible by k (a position,
not a counter of this process), before the checkpoint cadence saves, and the state holds the
averaged tensors and `n_averaged`. Ranks without SyncBN hold rank-local BN statistics; the trainer
gives every rank rank 0's EMA buffers before evaluating or saving, as for the model.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# -- the loss --------------------------------------------------------------------------------------

def smooth_targets(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Float [N, C] targets from hard labels or soft targets, label-smoothed."""
    if targets.is_floating_point():
        if targets.shape[-1] != num_classes:
            raise ValueError(f"soft targets of shape {tuple(targets.shape)} for {num_classes} classes")
        t = targets.float()
    else:
        # F.one_hot's result by scatter: one_hot reads the labels' min back to the host off CUDA
        t = targets.new_zeros(targets.shape[0], num_classes, dtype=torch.float32)
        t.scatter_(1, targets.long()[:, None], 1.0)
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


# -- the optimizer and its LR schedule ------------------------------------------------------------

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


# -- the weight EMA --------------------------------------------------------------------------------

def torchvision_decay_per_step(model_ema_decay: float, model_ema_steps: int, *, world_size: int,
                               batch_size: int, epochs: int) -> float:
    """torchvision's adjusted decay per EMA update (train.py), as our decay per optimizer step."""
    adjust = world_size * batch_size * model_ema_steps / epochs
    alpha = min(1.0, (1.0 - model_ema_decay) * adjust)
    return (1.0 - alpha) ** (1.0 / model_ema_steps)


class EMA:
    """The averaged copy of `model` (the bare module), updated every `every` optimizer steps."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup_steps: int = 0):
        self.every, self.warmup_steps = every, warmup_steps
        self.decay_per_update = decay ** every
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay_per_update),
                                      use_buffers=True)
        self.averaged.requires_grad_(False)
        self.source = model
        self.updates = 0  # the host's copy of averaged.n_averaged (a CPU tensor): read without a sync

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def after_step(self, step: int) -> None:
        """At optimizer step `step` (global): update every `every` steps; during the LR warmup keep
        copying the weights (torchvision)."""
        if step % self.every == 0:
            self.update()
            if step <= self.warmup_steps:
                self.updates = 0
                self.averaged.n_averaged.zero_()

    @torch.no_grad()
    def update(self) -> None:
        """`AveragedModel.update_parameters` without its host syncs: it tests `n_averaged` and
        hands `n_averaged.to(device)` to the average, a blocking copy from pageable memory on
        every update on CUDA. Here the count is a host int; the EMA's average ignores the count
        (get_ema_multi_avg_fn), and its ops are the same foreach lerp per (device, dtype) group."""
        ema = [*self.averaged.module.parameters(), *self.averaged.module.buffers()]
        src = [t.detach() for t in (*self.source.parameters(), *self.source.buffers())]
        if self.updates == 0:
            torch._foreach_copy_([t.detach() for t in ema], src)
        else:
            groups: dict = {}
            for e, m in zip(ema, src, strict=True):
                pair = groups.setdefault((e.device, e.dtype), ([], []))
                pair[0].append(e.detach())
                pair[1].append(m)
            for ema_group, model_group in groups.values():
                self.averaged.multi_avg_fn(ema_group, model_group, None)
        self.updates += 1
        self.averaged.n_averaged.add_(1)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()  # module.<name>..., n_averaged

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)
        self.updates = int(self.averaged.n_averaged)


def build_ema(cfg, model: nn.Module, steps_per_epoch: int) -> EMA | None:
    """The EMA of `model` if `cfg.optim.ema_decay` > 0 (saved as the named state "ema"), else None."""
    if not cfg.optim.ema_decay:
        return None
    warmup = int(cfg.schedule.warmup_epochs * steps_per_epoch)  # optimizer steps
    return EMA(model, cfg.optim.ema_decay, cfg.optim.ema_every, warmup_steps=warmup)
