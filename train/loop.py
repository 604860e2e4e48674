"""train_one_epoch and evaluate: the loop in plain sight.

Metrics are summed on the device and reduced across ranks only every `log.every` steps, so the
step itself never waits for the host. The loop asks `hooks` (checkpointing, signals, monitoring)
what to do after each step; it does not know how they are implemented.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from train.distributed import all_reduce_sum


class NonFiniteLoss(RuntimeError):
    pass


class StopTraining(Exception):
    """Raised by a hook to leave the loop after a completed step (signal, max_steps)."""


@dataclass
class TrainState:
    epoch: int = 0  # current epoch (0-based)
    step: int = 0  # global optimizer steps done since the start of the run
    sample_in_epoch: int = 0  # global samples consumed in `epoch`
    best_top1: float = -1.0


def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def train_one_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, criterion: nn.Module,
                    state: TrainState, amp: str, grad_clip: float, log_every: int, hooks) -> None:
    model.train()
    device = next(model.parameters()).device
    sums = torch.zeros(4, device=device)  # loss*n, correct, n, non-finite losses
    data_time, pending = 0.0, 0  # host time blocked on the loader, steps since the last log point

    def flush() -> None:
        """Reduce the metrics (the one host sync per interval); stop on a non-finite loss before
        any checkpoint could store the diverged state."""
        nonlocal data_time, pending
        reduced = all_reduce_sum(sums.clone()).tolist()
        sums.zero_()
        if reduced[3] > 0:
            raise NonFiniteLoss(f"non-finite loss before step {state.step} (epoch {state.epoch + 1}); "
                                "lower optim.lr or set optim.grad_clip; the last checkpoint is intact")
        hooks.log_train(state, loss=reduced[0] / reduced[2], top1=100 * reduced[1] / reduced[2],
                        lr=scheduler.get_last_lr()[0], data_time=data_time, loss_scale=scaler.get_scale())
        data_time, pending = 0.0, 0

    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        data_time += time.perf_counter() - t0
        hooks.on_batch(state, images)
        with autocast(device, amp):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        hooks.after_backward(state)
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with torch.no_grad():
            n = labels.new_tensor(labels.numel(), dtype=torch.float32)
            correct = (logits.argmax(1) == labels).sum()
            sums += torch.stack([loss.detach().float() * n, correct.float(), n,
                                 (~torch.isfinite(loss.detach())).float()])
        state.step += 1
        state.sample_in_epoch += labels.numel() * hooks.world_size  # equal batches on all ranks
        pending += 1
        if state.step % log_every == 0 or hooks.save_due(state):
            flush()
        hooks.after_step(state)
    if pending:  # the epoch's last steps, checked before its checkpoint
        flush()


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion: nn.Module, amp: str) -> dict[str, float]:
    """Exact top-1/top-5/loss over the whole split: each rank counts its disjoint share."""
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss*n, top1, top5, n
    for images, labels in loader:
        with autocast(device, amp):
            logits = model(images)
        loss = criterion(logits.float(), labels)
        top5 = logits.topk(min(5, logits.size(1)), dim=1).indices
        hit = top5 == labels[:, None]
        n = labels.numel()
        sums += torch.stack([loss.double() * n, hit[:, 0].sum().double(), hit.any(1).sum().double(),
                             torch.tensor(float(n), device=device, dtype=torch.float64)])
    loss_sum, top1, top5, n = all_reduce_sum(sums).tolist()
    if int(n) != loader.num_samples:
        raise RuntimeError(f"evaluated {int(n)} images but the validation set has {loader.num_samples}")
    return {"loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "count": int(n)}
