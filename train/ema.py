"""Weight EMA (`optim.ema_decay`, `optim.ema_every`): an exponential moving average of the weights,
evaluated next to the model at every evaluation (`val_ema/*` in TensorBoard), saved in every
checkpoint as the named state "ema" (tensors under `ema.module.`: `train.export --ema`,
`train.evaluate --ema`), and able to drive best.json (`checkpoint.best_by: val_ema`).

Built on `torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn` (not by hand), as
torchvision's reference (references/classification/utils.py `ExponentialMovingAverage`):
`use_buffers=True`, so the BN running statistics are averaged with the same decay as the weights
(and evaluated as such), and the EMA restarts as a copy of the weights (`n_averaged = 0`) after
every update during the LR warmup, as torchvision's train.py does in its warmup epochs.

Decay: `optim.ema_decay` is the decay per optimizer step. Updating every `ema_every` = k steps
uses decay ** k per update, so the average spans the same number of steps whatever k (k > 1 only
saves time). torchvision instead states its decay per image-independent "adjust"
(train.py: `adjust = world_size * batch_size * model_ema_steps / epochs`,
`alpha = min(1, (1 - model_ema_decay) * adjust)`, decay per update = 1 - alpha);
`torchvision_decay_per_step` converts its numbers into ours (configs/imagenet_resnet50_tv2.yaml).

Resume is exact: the update happens in `after_step` at global steps divisible by k (a position,
not a counter of this process), before the checkpoint cadence saves, and the state holds the
averaged tensors and `n_averaged`. Ranks without SyncBN hold rank-local BN statistics; the
trainer gives every rank rank 0's EMA buffers before evaluating or saving, as for the model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from train.loop import Callback, TrainState


def torchvision_decay_per_step(model_ema_decay: float, model_ema_steps: int, *, world_size: int,
                               batch_size: int, epochs: int) -> float:
    """torchvision's adjusted decay per EMA update (train.py), as our decay per optimizer step."""
    adjust = world_size * batch_size * model_ema_steps / epochs
    alpha = min(1.0, (1.0 - model_ema_decay) * adjust)
    return (1.0 - alpha) ** (1.0 / model_ema_steps)


class EMA(Callback):
    """The averaged copy of `model` (the bare module), updated every `every` optimizer steps."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup_steps: int = 0):
        self.every, self.warmup_steps = every, warmup_steps
        self.decay_per_update = decay ** every
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay_per_update),
                                      use_buffers=True)
        self.averaged.requires_grad_(False)
        self.source = model

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def after_step(self, state: TrainState) -> None:
        if state.step % self.every == 0:
            self.update()
            if state.step <= self.warmup_steps:  # torchvision: keep copying the weights during warmup
                self.averaged.n_averaged.fill_(0)

    @torch.no_grad()
    def update(self) -> None:
        self.averaged.update_parameters(self.source)

    def state_dict(self) -> dict:
        return self.averaged.state_dict()  # module.<name>..., n_averaged

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)


def build(cfg, model: nn.Module, steps_per_epoch: int) -> dict[str, EMA]:
    """{"ema": EMA} for the named checkpoint states if `cfg.optim.ema_decay` > 0, else {}."""
    if not cfg.optim.ema_decay:
        return {}
    warmup = int(cfg.schedule.warmup_epochs * steps_per_epoch)
    return {"ema": EMA(model, cfg.optim.ema_decay, cfg.optim.ema_every, warmup_steps=warmup)}
