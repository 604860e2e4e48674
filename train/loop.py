"""train_one_epoch and evaluate: the loop in plain sight.

Metrics are summed on the device and reduced across ranks only every `log.every` steps, so the
step itself never waits for the host. After each step the loop calls its callbacks
(train/callbacks.py: checkpoint cadence, stop on signal, monitoring); it does not know what
they do. A new logged scalar is one `sums.add(...)` here and one entry in `metrics`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from train.distributed import all_reduce_sum


class NonFiniteLoss(RuntimeError):
    pass


class StopTraining(Exception):
    """Raised by a callback to leave the loop after a completed step (signal, max_steps)."""


@dataclass
class TrainState:
    """Where the run is.

    - `step`: optimizer steps since the start, over every world size and batch the run had (logs,
      TensorBoard's x axis, checkpoint names); with accumulation one step is k micro-batches.
    - `epoch` (0-based) and `sample_in_epoch`: global samples consumed in the epoch (all ranks, all
      micro-batches), on any world size: where the data order stands, and with the current run's
      `epoch_samples` (optimizer steps per epoch x global batch) the schedule's position,
      `epoch + sample_in_epoch / epoch_samples` (train/optim.py).
    """

    epoch: int = 0
    step: int = 0
    sample_in_epoch: int = 0
    best_top1: float = -1.0

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


@dataclass
class TrainStep:
    """What one optimisation step needs."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp: str = "off"  # off | bf16 | fp16
    grad_clip: float = 0.0  # max global gradient norm; 0 = off


class Callback:
    """The loop's hook points; each is a no-op unless a subclass fills it in."""

    def on_batch(self, state: TrainState, images: torch.Tensor) -> None:
        """Before the forward pass."""

    def after_backward(self, state: TrainState) -> None:
        """Gradients are complete (all-reduced), the optimizer has not stepped yet."""

    def flush_due(self, state: TrainState) -> bool:
        """True if metrics must be reduced (and the loss checked) after this step, e.g. because a
        checkpoint follows."""
        return False

    def on_metrics(self, state: TrainState, metrics: dict[str, float]) -> None:
        """Metrics reduced over all ranks since the last call."""

    def after_step(self, state: TrainState) -> None:
        """After the step and any flush; may raise StopTraining."""


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


class Sums:
    """Named sums on the device; `reduce` adds them over ranks in one all-reduce and resets."""

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}

    def add(self, **values: torch.Tensor) -> None:
        for name, v in values.items():
            v = v.detach().float()
            self.values[name] = self.values[name] + v if name in self.values else v

    def reduce(self) -> dict[str, float]:
        names = sorted(self.values)
        totals = all_reduce_sum(torch.stack([self.values[n] for n in names])).tolist()
        self.values.clear()
        return dict(zip(names, totals))


def train_one_epoch(step: TrainStep, loader, state: TrainState, *, global_batch: int, log_every: int,
                    callbacks: Sequence[Callback] = (), accumulate: int = 1) -> None:
    """One epoch (or its rest, from `state.sample_in_epoch`). `global_batch`: samples per optimizer
    step over all ranks; `accumulate`: micro-batches per optimizer step (DDP no_sync on all but the
    last, loss / accumulate); the epoch's last loader.steps_per_epoch % accumulate micro-batches
    are not trained (as a batch that does not fill is dropped). After every optimizer step the
    scheduler is set to `epoch + sample_in_epoch / epoch_samples` (train/optim.py)."""
    model, optimizer, scaler = step.model, step.optimizer, step.scaler
    epoch_samples = loader.steps_per_epoch // accumulate * global_batch
    micro = 0  # micro-batches since the last optimizer step
    model.train()
    device = next(model.parameters()).device
    sums = Sums()
    data_time, pending = 0.0, 0  # host time blocked on the loader, steps since the last flush

    def flush() -> None:
        """Reduce the metrics (the one host sync per interval); stop on a non-finite loss before
        any checkpoint could store the diverged state."""
        nonlocal data_time, pending
        total = sums.reduce()
        if total["nonfinite"] > 0:
            raise NonFiniteLoss(f"non-finite loss before step {state.step} (epoch {state.epoch + 1}); "
                                "lower optim.lr or set optim.grad_clip; the last checkpoint is intact")
        metrics = {"loss": total["loss"] / total["count"], "top1": 100 * total["correct"] / total["count"],
                   "lr": step.scheduler.get_last_lr()[0], "data_time": data_time}
        for cb in callbacks:
            cb.on_metrics(state, metrics)
        data_time, pending = 0.0, 0

    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        data_time += time.perf_counter() - t0
        for cb in callbacks:
            cb.on_batch(state, images)
        micro += 1
        last = micro == accumulate
        no_sync = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with no_sync:  # DDP: gradients all-reduced on the last micro-batch only
            with autocast(device, step.amp):
                logits = model(images)
                loss = step.criterion(logits, labels)
            if micro == 1:
                optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss / accumulate).backward()  # x / 1 is x, bit for bit
        if last:
            for cb in callbacks:
                cb.after_backward(state)
            if step.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), step.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        with torch.no_grad():
            n = torch.tensor(float(labels.shape[0]), device=device)
            # soft targets (MixUp/CutMix, data/mix.py): a hit is the argmax of the mixed target, its dominant label
            target = labels if labels.ndim == 1 else labels.argmax(1)
            sums.add(loss=loss * n, correct=(logits.argmax(1) == target).sum(), count=n,
                     nonfinite=(~torch.isfinite(loss)).float())
        if not last:
            continue
        micro = 0
        state.step += 1
        state.sample_in_epoch += global_batch  # equal batches on all ranks
        step.scheduler.set_progress(state.epoch + state.sample_in_epoch / epoch_samples)
        pending += 1
        if state.step % log_every == 0 or any(cb.flush_due(state) for cb in callbacks):
            flush()
        for cb in callbacks:
            cb.after_step(state)
        if accumulate > 1 and state.sample_in_epoch >= epoch_samples:  # the rest cannot fill a step
            break
    if pending:  # the epoch's last steps, checked before its checkpoint
        flush()


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion: nn.Module, amp: str, *, hflip_tta: bool = False) -> dict[str, float]:
    """Exact top-1/top-5/loss over the whole split: each rank counts its disjoint share.
    `hflip_tta`: the logits are the mean of the image's and its mirror image's."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss*n, top1, top5, n
    for images, labels in loader:
        with autocast(device, amp):
            logits = model(images).float()
            if hflip_tta:
                logits = (logits + model(images.flip(3)).float()) / 2
        loss = criterion(logits, labels)
        top5 = logits.topk(min(5, logits.size(1)), dim=1).indices
        hit = top5 == labels[:, None]
        n = labels.numel()
        sums += torch.stack([loss.double() * n, hit[:, 0].sum().double(), hit.any(1).sum().double(),
                             torch.tensor(float(n), device=device, dtype=torch.float64)])
    loss_sum, top1, top5, n = all_reduce_sum(sums).tolist()
    if int(n) != loader.num_samples:
        raise RuntimeError(f"evaluated {int(n)} images but the validation set has {loader.num_samples}")
    return {"loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "count": int(n)}
