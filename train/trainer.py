"""The training run, top to bottom: build it, then epochs of train → evaluate → checkpoint.

`build_run` makes every object of a run once and keeps it in `Run`, under one name each; the
quantities derived from the config and the machine (micro-batch, accumulation, steps per epoch,
amp, threads) are decided there once, in `Plan`. `train_epoch` is the step loop: what follows a
step (the metric flush with its NaN and signal checks, the checkpoint cadence, the stop) is plain
calls in it. `fit` is the epoch loop with the evaluation and the end-of-epoch checkpoint.

No host sync in the step: metrics are summed on the device and reduced over ranks in one
all-reduce every `log.every` steps (and before each checkpoint); that flush is the only point
where the host waits for the device (tests/test_host_sync.py counts). One exception, not ours:
torch's SyncBatchNorm (`model.sync_bn` on several GPUs; off in every shipped config) reads its
per-rank counts back once per BN layer in the forward (pytorch#78549).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from data import build_loaders, mix
from train import checkpoint, hardware, models, sync_batchnorm
from train import config as config_lib
from train.distributed import DistInfo, all_reduce_sum, seed_everything
from train.monitor import Monitor, RunSummary, setup_logging
from train.optim import EMA, build_criterion, build_ema, build_optimizer, build_scheduler
from train.watchdog import Watchdog

log = logging.getLogger("resnet")
REQUEUE_EXIT_CODE = 3  # "saved on a signal; start me again" (slurm/ and torchrun restarts use it)


class NonFiniteLoss(RuntimeError):
    pass


class Requeue(SystemExit):
    def __init__(self):
        super().__init__(REQUEUE_EXIT_CODE)


class StopSignal:
    """SIGUSR1/SIGTERM (SLURM, before a preemption or the time limit) set a flag instead of killing
    the process; ranks agree on it at the next metric flush, so a signal that reached only some
    ranks still stops all of them at the same step. Installed first thing in fit()."""

    def __init__(self):
        self.received = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        log.warning("received %s: will save a checkpoint and exit for requeue", signal.Signals(signum).name)
        self.received = True


@dataclass
class TrainState:
    """Where the run is.

    - `step`: optimizer steps since the start, over every world size and batch the run had (logs,
      TensorBoard's x axis, checkpoint names); with accumulation one step is k micro-batches.
    - `epoch` (0-based) and `sample_in_epoch`: global samples consumed in the epoch (all ranks, all
      micro-batches), on any world size: where the data order stands, and with the current run's
      `epoch_samples` the schedule's position, `epoch + sample_in_epoch / epoch_samples`.
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


@dataclass(frozen=True)
class Plan:
    """What the config and the machine decide together, once per run."""

    micro_batch: int  # per rank and forward pass
    accumulate: int  # micro-batches per optimizer step
    global_batch: int  # samples per optimizer step, all ranks and micro-batches
    steps_per_epoch: int  # optimizer steps
    amp: str  # off | bf16 | fp16 (train.amp, `auto` resolved)
    threads: int  # intra-op threads per rank

    @property
    def epoch_samples(self) -> int:
        return self.steps_per_epoch * self.global_batch


@dataclass
class Run:
    """Everything a run is made of, built once by `build_run`."""

    cfg: config_lib.Config
    info: DistInfo
    plan: Plan
    model: nn.Module  # what trains: DDP-wrapped and compiled as configured
    bare: nn.Module  # the same module unwrapped: evaluation, checkpoints, monitoring
    optimizer: torch.optim.Optimizer
    scheduler: Any  # train/optim.py SampleLR
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    ema: EMA | None
    train_loader: Any
    val_loader: Any
    checkpointer: checkpoint.Checkpointer
    monitor: Monitor
    stop: StopSignal
    state: TrainState = dataclasses.field(default_factory=TrainState)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def states(self) -> dict:
        """The named states of a checkpoint (train/checkpoint.py): one entry each."""
        return {"model": checkpoint.ModelState(self.bare),
                "optim": checkpoint.OptimizerState(self.bare, self.optimizer),
                "scheduler": self.scheduler, "scaler": self.scaler, "train_state": self.state,
                "config": checkpoint.Value(config_lib.to_dict(self.cfg)),
                f"rng_rank{self.info.rank}": checkpoint.RNGState(self.info.world_size, self.info.device),
                **({"ema": self.ema} if self.ema is not None else {})}

    def save(self, top1: float | None = None, wait: bool = False) -> None:
        """Checkpoint (in the background with `checkpoint.async_save`); one host sync: the
        weights must be finite, since the loss check trails them by one step."""
        sync_buffers(self.bare)
        if self.ema is not None:
            sync_buffers(self.ema.module)
        if not all_finite(self.bare):
            raise NonFiniteLoss(f"non-finite weights at step {self.state.step}; lower optim.lr or set "
                                "optim.grad_clip; the last checkpoint is intact")
        self.checkpointer.save(self.states(), step=self.state.step, top1=top1)
        if wait:
            self.checkpointer.wait()

    def validate(self) -> dict[str, float]:
        """The model's val metrics, and the EMA's as `ema_*` (logged as val_ema/*)."""
        metrics = {}
        for prefix, module in (("val", self.bare), ("val_ema", self.ema and self.ema.module)):
            if module is None:
                continue
            sync_buffers(module)
            m = evaluate(module, self.val_loader, nn.CrossEntropyLoss(), self.plan.amp,
                         hflip_tta=self.cfg.train.eval_hflip)
            self.monitor.log_eval(self.state, m, prefix=prefix)
            metrics.update(m if prefix == "val" else {f"ema_{k}": v for k, v in m.items()})
        return metrics


# -- building ------------------------------------------------------------------------------------

def build_model(cfg, num_classes: int, info: DistInfo) -> tuple[nn.Module, nn.Module]:
    """(model to train, possibly DDP-wrapped (build_run compiles it); the bare module for eval and saving)."""
    model = models.build(cfg.model, num_classes)
    if info.world_size > 1 and cfg.model.sync_bn:
        model = sync_batchnorm.convert(model, info.device)
    model = model.to(info.device)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    bare = model
    if info.world_size > 1:
        model = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                    bucket_cap_mb=cfg.dist.bucket_cap_mb,
                    gradient_as_bucket_view=cfg.dist.gradient_as_bucket_view,
                    static_graph=cfg.dist.static_graph)
    return model, bare


def build_run(cfg: config_lib.Config, info: DistInfo, stop: StopSignal) -> Run:
    """Every object of the run, in the order each needs the others; resumed if asked to."""
    run_dir = cfg.run_dir
    split = config_lib.split_batch(cfg.data, cfg.optim, info.world_size)  # ConfigError if it cannot split
    resume_from = checkpoint.find_resume(cfg.train.resume, run_dir)
    if resume_from is not None:  # before anything is written: a refused recipe change leaves the run as it was
        check_recipe(cfg, resume_from, info.world_size)
    if info.is_main:
        config_lib.save(cfg, run_dir / "config.yaml")
    train_loader, val_loader, classes = build_loaders(cfg.data, info, batch=split.batch, seed=cfg.train.seed,
                                                      channels_last=cfg.model.channels_last)
    num_classes = cfg.data.num_classes or len(classes)
    train_loader = mix.wrap(train_loader, cfg.data, num_classes=num_classes, seed=cfg.train.seed,
                            world_size=info.world_size, rank=info.rank)  # MixUp/CutMix: soft targets
    steps_per_epoch = train_loader.steps_per_epoch // split.accumulate  # optimizer steps
    if steps_per_epoch == 0:
        raise config_lib.ConfigError(f"data.global_batch: {split.global_batch} is more than the training set holds")
    model, bare = build_model(cfg, num_classes, info)
    amp, threads, step_s = hardware.choose(cfg, info, bare, split.batch, train_loader)  # probes cached; logged
    planned = min(cfg.train.max_steps or math.inf, cfg.train.epochs * steps_per_epoch)
    model = hardware.maybe_compile(cfg, info, model, bare, amp, planned, split.batch, step_s)  # logged
    plan = Plan(micro_batch=split.batch, accumulate=split.accumulate, global_batch=split.global_batch,
                steps_per_epoch=steps_per_epoch, amp=amp, threads=threads)

    optimizer = build_optimizer(cfg.optim, model, plan.global_batch)
    run = Run(cfg=cfg, info=info, plan=plan, model=model, bare=bare, optimizer=optimizer,
              scheduler=build_scheduler(cfg.schedule, optimizer, steps_per_epoch, cfg.train.epochs, plan.global_batch),
              scaler=torch.amp.GradScaler(info.device.type, enabled=plan.amp == "fp16"),
              criterion=build_criterion(cfg.optim), ema=build_ema(cfg, bare, steps_per_epoch),
              train_loader=train_loader, val_loader=val_loader,
              checkpointer=checkpoint.Checkpointer(cfg.checkpoint, run_dir, info),
              monitor=Monitor(cfg.log, run_dir=run_dir, info=info, data=cfg.data, epochs=cfg.train.epochs,
                              steps_per_epoch=steps_per_epoch, global_batch=plan.global_batch,
                              max_steps=cfg.train.max_steps),
              stop=stop)
    if resume_from is not None:
        resume(run, resume_from)
    run.monitor.watch(bare, val_loader, run.scaler)  # rank 0: norms, feature-map probe image, graph
    run.monitor.tb.text("config", "```\n" + (run_dir / "config.yaml").read_text() + "\n```" if info.is_main else "")
    log.info("%s on %d x %s, %d classes, %s, %d steps/epoch, amp %s", cfg.model.name, info.world_size,
             info.device.type, num_classes, split.describe(info.world_size), steps_per_epoch, plan.amp)
    return run


def check_recipe(cfg: config_lib.Config, path: Path, world: int) -> None:
    """Stop (ConfigError, one line) if the new config changes the checkpoint's recipe beyond
    train.allow_changes; log the changes it may make (config.check_resume). The checkpoint's world
    size is its number of per-rank RNG states."""
    old = checkpoint.load_value(path, "config")
    if old is None:
        log.warning("%s holds no config: the recipe is not compared", path)
        return
    old_world = len({k.split(".")[0] for k in checkpoint.saved_keys(path) if k.startswith("rng_rank")}) or None
    changed = config_lib.check_resume(old, cfg, world, old_world, path.name)
    if changed:
        log.info("resume from %s changes: %s", path.name, "; ".join(changed))


def resume(run: Run, path: Path) -> None:
    """Load every named state from `path`, then put the LR where the samples trained put it on this
    run's curve, with this run's peak (logged if the global batch changed it: the linear rule)."""
    run.checkpointer.load(path, run.states())
    state, scheduler = run.state, run.scheduler
    scheduler.set_progress(state.epoch + state.sample_in_epoch / run.plan.epoch_samples)
    peak, old = scheduler.base_lrs[0], scheduler.saved_peak
    if old is not None and not math.isclose(peak, old, rel_tol=1e-9):
        log.info("peak LR %.6g for global batch %d (linear rule) instead of the checkpoint's %.6g for global "
                 "batch %s", peak, scheduler.global_batch, old, scheduler.saved_global_batch or "?")
    log.info("resumed from %s: epoch %d, step %d, %d samples into the epoch",
             path, state.epoch + 1, state.step, state.sample_in_epoch)


def sync_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's BN statistics (as DDP does at each forward) before evaluating or
    saving, so that all ranks evaluate one model and a checkpoint holds one consistent set."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        for b in module.buffers():
            torch.distributed.broadcast(b, 0)


def all_finite(module: nn.Module) -> bool:
    """One host sync per checkpoint: every parameter and buffer is finite (same on all ranks).
    It also orders an async save after the step: the save's staging copies start only once the
    device has finished writing the weights (train/checkpoint.py)."""
    tensors = [t.detach() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return bool(torch.nn.utils.get_total_norm(tensors, foreach=True).isfinite())


# -- the step loop ---------------------------------------------------------------------------------

def autocast(device: torch.device, amp: str):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if amp == "fp16" else torch.bfloat16)


class Sums:
    """Metric sums between two flushes: tensors stay on the device, plain numbers on the host;
    `reduce` adds both over ranks in one all-reduce (the flush's one host sync) and resets."""

    def __init__(self, device: torch.device):
        self.device, self.tensors, self.numbers = device, {}, {}

    def add(self, **values) -> None:
        for name, v in values.items():
            into = self.tensors if isinstance(v, torch.Tensor) else self.numbers
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            into[name] = into[name] + v if name in into else v

    def __bool__(self) -> bool:
        return bool(self.tensors or self.numbers)

    def reduce(self) -> dict[str, float]:
        names, numbers = sorted(self.tensors), sorted(self.numbers)
        on_device = [self.tensors[n] for n in names] or [torch.zeros(0, device=self.device)]
        local = torch.cat([torch.stack(on_device) if names else on_device[0],
                           torch.tensor([self.numbers[n] for n in numbers], device=self.device)])
        totals = all_reduce_sum(local).tolist()
        self.tensors, self.numbers = {}, {}
        return dict(zip(names + numbers, totals))


def train_epoch(run: Run) -> str | None:
    """One epoch, or its rest from `state.sample_in_epoch`. Returns why it stopped early:
    "signal" (a rank got SIGUSR1/SIGTERM), "max_steps", or None at the epoch's end.

    With `accumulate` = k micro-batches per optimizer step, DDP all-reduces on the last only
    (no_sync) and each loss is divided by k; the epoch's last `steps % k` micro-batches cannot
    fill a step and are drained untrained, as a batch that does not fill is dropped (the loader
    then stands at the next epoch: DALI keeps its pipeline)."""
    cfg, plan, state = run.cfg, run.plan, run.state
    model, optimizer, scaler, device = run.model, run.optimizer, run.scaler, run.info.device
    model.train()
    sums, micro, data_time = Sums(device), 0, 0.0
    save_every, max_steps = cfg.checkpoint.every_steps, cfg.train.max_steps
    t = time.perf_counter()
    for images, labels in run.train_loader:
        data_time += time.perf_counter() - t
        if state.sample_in_epoch >= plan.epoch_samples:  # the micro-batches that cannot fill a step
            t = time.perf_counter()
            continue
        run.checkpointer.wait_staged()  # an async save must have copied the weights before they change
        run.monitor.log_inputs(state, images)  # once
        micro += 1
        last = micro == plan.accumulate
        with model.no_sync() if not last and isinstance(model, DDP) else contextlib.nullcontext():
            with autocast(device, plan.amp):
                logits = model(images)
                loss = run.criterion(logits, labels)
            if micro == 1:
                optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss / plan.accumulate).backward()  # x / 1 is x, bit for bit
        with torch.no_grad():
            n = labels.shape[0]  # a host int: a device tensor from it would be a blocking copy on CUDA
            target = labels if labels.ndim == 1 else labels.argmax(1)  # MixUp/CutMix: the dominant label
            sums.add(loss=loss * n, correct=(logits.argmax(1) == target).sum(), count=n,
                     nonfinite=(~torch.isfinite(loss)).float())
        if not last:
            t = time.perf_counter()
            continue
        micro = 0
        run.monitor.grad_norms(state)  # every log.grad_norm_every steps, kept on the device
        if cfg.optim.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        state.step += 1
        state.sample_in_epoch += plan.global_batch
        run.scheduler.set_progress(state.epoch + state.sample_in_epoch / plan.epoch_samples)
        if run.ema is not None:
            run.ema.after_step(state.step)

        save = bool(save_every) and state.step % save_every == 0
        at_max = bool(max_steps) and state.step >= max_steps
        stop = False
        if state.step % cfg.log.every == 0 or save or at_max:  # a checkpoint is never of a diverged state
            stop = flush(run, sums, data_time)
            data_time = 0.0
        if save:
            run.save()
        if stop:
            return "signal"
        if at_max:
            return "max_steps"
        t = time.perf_counter()
    if sums:  # the epoch's last steps, checked before its checkpoint
        flush(run, sums, data_time)
    return None


def flush(run: Run, sums: Sums, data_time: float) -> bool:
    """Reduce the interval's metrics over ranks, the step loop's one host sync; stop on a
    non-finite loss; log. Returns True if any rank got a stop signal (it rides in the same
    all-reduce)."""
    state = run.state
    sums.add(stop=float(run.stop.received))
    total = sums.reduce()
    if total["nonfinite"] > 0:
        raise NonFiniteLoss(f"non-finite loss before step {state.step} (epoch {state.epoch + 1}); "
                            "lower optim.lr or set optim.grad_clip; the last checkpoint is intact")
    count = total["count"]
    run.monitor.log_train(state, {"loss": total["loss"] / count, "top1": 100 * total["correct"] / count,
                                  "lr": run.scheduler.get_last_lr()[0], "data_time": data_time})
    return total["stop"] > 0


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion: nn.Module, amp: str, *, hflip_tta: bool = False) -> dict[str, float]:
    """Exact top-1/top-5/loss over the whole split: each rank counts its disjoint share.
    `hflip_tta`: the logits are the mean of the image's and its mirror image's."""
    model.eval()
    device = next(model.parameters()).device
    sums, n = torch.zeros(3, device=device, dtype=torch.float64), 0  # loss*n, top1, top5 on the device
    for images, labels in loader:
        with autocast(device, amp):
            logits = model(images).float()
            if hflip_tta:
                logits = (logits + model(images.flip(3)).float()) / 2
        loss = criterion(logits, labels)
        hit = logits.topk(min(5, logits.size(1)), dim=1).indices == labels[:, None]
        sums += torch.stack([loss.double() * labels.numel(), hit[:, 0].sum().double(), hit.any(1).sum().double()])
        n += labels.numel()
    loss_sum, top1, top5, n = all_reduce_sum(torch.cat([sums, torch.tensor([float(n)], device=device,
                                                                         dtype=torch.float64)])).tolist()
    if int(n) != loader.num_samples:
        raise RuntimeError(f"evaluated {int(n)} images but the validation set has {loader.num_samples}")
    return {"loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "count": int(n)}


# -- the epoch loop ------------------------------------------------------------------------------

def train_epochs(run: Run) -> tuple[dict[str, float], float, int]:
    """Epochs of train → evaluate → checkpoint until the last epoch, max_steps or a signal.
    Returns the last evaluation's metrics, the training seconds and the samples trained."""
    cfg, state = run.cfg, run.state
    metrics = {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
    train_time, samples = 0.0, 0
    while state.epoch < cfg.train.epochs:
        t0, step0 = time.perf_counter(), state.step
        run.train_loader.set_epoch(state.epoch, state.sample_in_epoch)
        run.monitor.start_epoch(state)
        stopped = train_epoch(run)
        train_time += time.perf_counter() - t0
        samples += (state.step - step0) * run.plan.global_batch
        run.monitor.end_epoch(state, time.perf_counter() - t0)
        if stopped == "signal":
            run.save(wait=True)
            log.warning("saved step %d; exiting with code %d for requeue", state.step, REQUEUE_EXIT_CODE)
            raise Requeue()
        if stopped == "max_steps":  # save mid-epoch, evaluate for the summary
            run.save()
            metrics = run.validate()
            break
        state.epoch, state.sample_in_epoch = state.epoch + 1, 0
        last = state.epoch == cfg.train.epochs
        top1 = None
        if state.epoch % cfg.train.eval_every == 0 or last:
            metrics = run.validate()
            top1 = metrics["top1"]
            state.best_top1 = max(state.best_top1, top1)
            if cfg.checkpoint.best_by == "val_ema":
                top1 = metrics["ema_top1"]
        if state.epoch % cfg.checkpoint.every_epochs == 0 or last:
            run.save(top1)
    return metrics, train_time, samples


def finish(run: Run, metrics: dict[str, float], *, wall_time: float, train_time: float, samples: int) -> dict:
    """Close the checkpointer and the monitor; write and print the summary."""
    run.checkpointer.close()
    if metrics["top1"] != metrics["top1"]:  # resumed after the last epoch: nothing evaluated yet
        metrics = run.validate()
    if run.train_loader.skipped:
        log.warning("%d unreadable training images were skipped (see warnings above)", run.train_loader.skipped)
    summary = RunSummary(run.run_dir, is_main=run.info.is_main)
    summary.update(final_top1=metrics["top1"], final_top5=metrics["top5"], final_val_loss=metrics["loss"],
                   best_top1=max(run.state.best_top1, metrics["top1"]), epochs=run.state.epoch,
                   **({"final_ema_top1": metrics["ema_top1"]} if "ema_top1" in metrics else {}),
                   steps=run.state.step, wall_time_s=wall_time, train_images_per_s=samples / max(train_time, 1e-9),
                   world_size=run.info.world_size, device=run.info.device.type,
                   config=config_lib.to_dict(run.cfg))
    run.monitor.finish(summary)
    summary.write()
    run.monitor.close()
    return dict(summary)


def fit(cfg: config_lib.Config, info: DistInfo) -> dict:
    stop = StopSignal()
    setup_logging(info.rank)
    t_start = time.perf_counter()
    seed_everything(cfg.train.seed, info.rank, cfg.train.deterministic)
    torch.backends.cudnn.benchmark = not cfg.train.deterministic
    run = build_run(cfg, info, stop)
    with Watchdog(run):  # heartbeats: a hung rank named, stragglers, the training collective timeout
        metrics, train_time, samples = train_epochs(run)
    return finish(run, metrics, wall_time=time.perf_counter() - t_start, train_time=train_time, samples=samples)
