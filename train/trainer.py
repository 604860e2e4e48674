"""fit(): build the run from the config, resume, epochs of train → evaluate → checkpoint, finish.

`build_run` makes every part (model, loaders, optimizer, checkpointer, monitor), `train_epochs`
is the epoch loop, `finish` fills the run summary. What the step loop calls after each step
(checkpoint cadence, stop on signal, monitoring) is in train/callbacks.py and train/monitor.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from data import build_loaders, mix
from train import config as config_lib
from train import ema as ema_lib
from train import hardware, models, sync_batchnorm
from train.callbacks import CheckpointCadence, StopOnSignal, StopSignal, WaitForStaging
from train.checkpoint import (
    Checkpointer,
    ModelState,
    OptimizerState,
    RNGState,
    Value,
    find_resume,
    load_value,
    saved_keys,
)
from train.distributed import DistInfo, all_reduce_sum, seed_everything
from train.loop import NonFiniteLoss, StopTraining, TrainState, TrainStep, evaluate, train_one_epoch
from train.losses import build_criterion
from train.monitor import Monitor, RunSummary, setup_logging
from train.optim import build_optimizer, build_scheduler

log = logging.getLogger("resnet")
REQUEUE_EXIT_CODE = 3  # "saved on a signal; start me again" (slurm/ and torchrun restarts use it)


class Requeue(SystemExit):
    def __init__(self):
        super().__init__(REQUEUE_EXIT_CODE)


def build_model(cfg, num_classes: int, info: DistInfo) -> tuple[nn.Module, nn.Module]:
    """(model to train, possibly DDP-wrapped and compiled; the bare module for eval and saving)."""
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
    if cfg.model.compile:
        model = torch.compile(model)
    return model, bare


def sync_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's BN statistics (as DDP does at each forward) before evaluating or
    saving, so that all ranks evaluate one model and a checkpoint holds one consistent set."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        for b in module.buffers():
            torch.distributed.broadcast(b, 0)


def all_finite(module: nn.Module) -> bool:
    """One host sync per checkpoint: every parameter and buffer is finite (same on all ranks)."""
    tensors = [t.detach() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return bool(torch.nn.utils.get_total_norm(tensors, foreach=True).isfinite())


def set_threads(cfg, info: DistInfo) -> int:
    """Intra-op threads from this rank's share of the CPUs (torchrun's OMP_NUM_THREADS=1 would
    leave the rest idle); an OMP_NUM_THREADS other than torchrun's 1 is the user's and is kept."""
    user = os.environ.get("OMP_NUM_THREADS", "1")
    if user != "1" and not cfg.dist.cpu_threads:
        threads = int(user)
    else:
        mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        masks = [(socket.gethostname(), mask)]
        if torch.distributed.is_initialized() and info.world_size > 1:
            masks = [None] * info.world_size
            torch.distributed.all_gather_object(masks, (socket.gethostname(), mask))
        sharing = sum(host == socket.gethostname() and bool(m & mask) for host, m in masks)
        # decode workers on this node's CPUs: the torch loader's processes, DALI's threads when DALI
        # decodes on the CPU (1.76x vs 1.20x a plain loop with 1 intra-op thread instead of 2 beside
        # 2 DALI threads on 2 cores: benchmarks/plain_loop.py); on the GPU, DALI's threads mostly wait
        dali_cpu = cfg.data.loader == "dali" and (info.device.type == "cpu" or cfg.data.dali_device == "cpu")
        workers = cfg.data.workers if cfg.data.loader == "torch" or dali_cpu else 0
        threads = hardware.cpu_threads(cfg.dist.cpu_threads, cpus=len(mask), sharing=sharing, loader_workers=workers)
    torch.set_num_threads(threads)
    return threads


def choose_amp(cfg, info: DistInfo, bare: nn.Module, batch: int) -> str:
    """train.amp, with `auto` decided by the hardware (train/hardware.py) at the micro-batch `batch`
    each rank runs; logged in one line."""
    def mean_over_ranks(values: list[float]) -> list[float]:
        t = all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=info.device))
        return (t / info.world_size).tolist()

    key = (f"{cfg.model.name}|batch {batch}|crop {cfg.data.train_crop}|channels_last "
           f"{cfg.model.channels_last}|threads {torch.get_num_threads()}|ranks/node {info.local_world_size}")
    amp, why = hardware.choose_amp(
        cfg.train.amp, info.device, key=key, reduce=mean_over_ranks, write_cache=info.local_rank == 0,
        measure=lambda: hardware.probe(bare, batch, cfg.data.train_crop, cfg.model.channels_last))
    if info.device.type == "cuda":
        hardware.allow_tf32()
    log.info("amp %s: %s", amp, why)
    return amp


@dataclass
class Run:
    """Everything a run is made of, built once by `build_run`."""

    cfg: config_lib.Config
    info: DistInfo
    step: TrainStep
    bare: nn.Module  # the unwrapped model: evaluation, checkpoints, monitoring
    train_loader: object
    val_loader: object
    global_batch: int  # samples per optimizer step, all ranks and micro-batches
    checkpointer: Checkpointer
    monitor: Monitor
    states: dict  # named states saved in every checkpoint (train/checkpoint.py)
    state: TrainState = field(default_factory=TrainState)
    accumulate: int = 1  # micro-batches per optimizer step
    eval_criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def save(self, top1: float | None = None, wait: bool = False) -> None:
        sync_buffers(self.bare)
        if "ema" in self.states:
            sync_buffers(self.states["ema"].module)
        if not all_finite(self.bare):  # the loss check trails the weights by one step
            raise NonFiniteLoss(f"non-finite weights at step {self.state.step}; lower optim.lr or set "
                                "optim.grad_clip; the last checkpoint is intact")
        self.checkpointer.save(self.states, step=self.state.step, top1=top1)
        if wait:
            self.checkpointer.wait()

    def validate(self) -> dict[str, float]:
        sync_buffers(self.bare)
        metrics = evaluate(self.bare, self.val_loader, self.eval_criterion, self.step.amp,
                           hflip_tta=self.cfg.train.eval_hflip)
        self.monitor.log_eval(self.state, metrics)
        if "ema" in self.states:  # the weight EMA (train/ema.py), logged as val_ema/*
            ema = self.states["ema"].module
            sync_buffers(ema)
            ema_metrics = evaluate(ema, self.val_loader, self.eval_criterion, self.step.amp,
                                   hflip_tta=self.cfg.train.eval_hflip)
            self.monitor.log_eval(self.state, ema_metrics, prefix="val_ema")
            metrics = {**metrics, **{f"ema_{k}": v for k, v in ema_metrics.items()}}
        return metrics


def build_run(cfg: config_lib.Config, info: DistInfo) -> Run:
    """Model, loaders, optimizer, schedule, checkpointer and monitor; resumed if asked to."""
    run_dir = cfg.run_dir
    split = config_lib.split_batch(cfg.data, cfg.optim, info.world_size)  # ConfigError if it cannot split
    resume_from = find_resume(cfg.train.resume, run_dir)
    if resume_from is not None:  # before anything is written: a refused recipe change leaves the run as it was
        check_recipe(cfg, resume_from, info.world_size)
    if info.is_main:
        config_lib.save(cfg, run_dir / "config.yaml")
    threads = set_threads(cfg, info)
    log.info("%s; %d intra-op threads per rank", hardware.machine_header(info.device), threads)
    train_loader, val_loader, classes = build_loaders(dataclasses.replace(cfg.data, batch_size=split.batch), info,
                                                      seed=cfg.train.seed,
                                                      channels_last=cfg.model.channels_last)
    num_classes = cfg.data.num_classes or len(classes)
    train_loader = mix.wrap(train_loader, cfg.data, num_classes=num_classes, seed=cfg.train.seed,
                            world_size=info.world_size, rank=info.rank)  # MixUp/CutMix: soft targets
    model, bare = build_model(cfg, num_classes, info)
    global_batch = split.global_batch
    steps_per_epoch = train_loader.steps_per_epoch // split.accumulate  # optimizer steps
    if steps_per_epoch == 0:
        raise config_lib.ConfigError(f"data.global_batch: {global_batch} is more than the training set holds")
    step = build_step(cfg, info, model, bare, batch=split.batch, global_batch=global_batch,
                      steps_per_epoch=steps_per_epoch)
    state = TrainState()
    states = {"model": ModelState(bare), "optim": OptimizerState(bare, step.optimizer), "scheduler": step.scheduler,
              "scaler": step.scaler, "train_state": state, "config": Value(config_lib.to_dict(cfg)),
              f"rng_rank{info.rank}": RNGState(info.world_size),
              **ema_lib.build(cfg, bare, steps_per_epoch)}  # optimizer steps: the EMA warmup
    checkpointer = Checkpointer(cfg.checkpoint, run_dir, info)
    if resume_from is not None:
        resume(cfg, checkpointer, resume_from, states, epoch_samples=steps_per_epoch * global_batch)
    monitor = Monitor(cfg.log, run_dir=run_dir, info=info, data=cfg.data, epochs=cfg.train.epochs,
                      steps_per_epoch=steps_per_epoch, global_batch=global_batch,
                      max_steps=cfg.train.max_steps)
    monitor.watch(bare, val_loader, step.scaler)  # rank 0: norms, feature-map probe image, graph
    monitor.tb.text("config", "```\n" + (run_dir / "config.yaml").read_text() + "\n```" if info.is_main else "")
    log.info("%s on %d x %s, %d classes, %s, %d steps/epoch, amp %s", cfg.model.name,
             info.world_size, info.device.type, num_classes, split.describe(info.world_size), steps_per_epoch, step.amp)
    return Run(cfg=cfg, info=info, step=step, bare=bare, train_loader=train_loader, val_loader=val_loader,
               global_batch=global_batch, checkpointer=checkpointer, monitor=monitor, states=states, state=state,
               accumulate=split.accumulate)


def build_step(cfg: config_lib.Config, info: DistInfo, model: nn.Module, bare: nn.Module, *, batch: int,
               global_batch: int, steps_per_epoch: int) -> TrainStep:
    """Optimizer, LR schedule, loss scaler, loss and autocast dtype around the (DDP) model."""
    amp = choose_amp(cfg, info, bare, batch)
    optimizer = build_optimizer(cfg.optim, model, global_batch)
    return TrainStep(model=model, optimizer=optimizer,
                     scheduler=build_scheduler(cfg.schedule, optimizer, steps_per_epoch, cfg.train.epochs,
                                               global_batch),
                     scaler=torch.amp.GradScaler(info.device.type, enabled=amp == "fp16"),
                     criterion=build_criterion(cfg.optim), amp=amp, grad_clip=cfg.optim.grad_clip)


def resume(cfg: config_lib.Config, checkpointer: Checkpointer, path: Path, states: dict, *,
           epoch_samples: int) -> None:
    """Load every named state from `path`, then put the LR on this run's curve."""
    checkpointer.load(path, states)
    states["config"].value = config_lib.to_dict(cfg)  # the next checkpoint holds this run's config
    state = states["train_state"]
    resume_schedule(states["scheduler"], state, epoch_samples)
    log.info("resumed from %s: epoch %d, step %d, %d samples into the epoch",
             path, state.epoch + 1, state.step, state.sample_in_epoch)


def check_recipe(cfg: config_lib.Config, path: Path, world: int) -> None:
    """Stop (ConfigError, one line) if the new config changes the checkpoint's recipe beyond
    train.allow_changes; log the changes it may make (config.check_resume). The checkpoint's world
    size is its number of per-rank RNG states."""
    old = load_value(path, "config")
    if old is None:
        log.warning("%s holds no config: the recipe is not compared", path)
        return
    old_world = len({k.split(".")[0] for k in saved_keys(path) if k.startswith("rng_rank")}) or None
    changed = config_lib.check_resume(old, cfg, world, old_world, path.name)
    if changed:
        log.info("resume from %s changes: %s", path.name, "; ".join(changed))


def resume_schedule(scheduler, state: TrainState, epoch_samples: int) -> None:
    """Put the LR where the samples trained put it on this run's curve, with this run's peak; log a
    peak that differs from the checkpoint's (the global batch changed: the linear rule)."""
    scheduler.set_progress(state.epoch + state.sample_in_epoch / epoch_samples)
    peak, old = scheduler.base_lrs[0], scheduler.saved_peak
    if old is not None and not math.isclose(peak, old, rel_tol=1e-9):
        log.info("peak LR %.6g for global batch %d (linear rule) instead of the checkpoint's %.6g for global "
                 "batch %s", peak, scheduler.global_batch, old, scheduler.saved_global_batch or "?")


def train_epochs(run: Run, stop: StopSignal) -> tuple[dict[str, float], float, int]:
    """Epochs of train → evaluate → checkpoint until the last epoch, max_steps or a signal.
    Returns the last evaluation's metrics, the training seconds and the samples trained."""
    cfg, state = run.cfg, run.state
    callbacks = [WaitForStaging(run.checkpointer), run.monitor,
                 *[run.states[n] for n in ("ema",) if n in run.states],  # before the cadence saves
                 CheckpointCadence(every_steps=cfg.checkpoint.every_steps, max_steps=cfg.train.max_steps,
                                   save=lambda _: run.save()),
                 StopOnSignal(stop, every=cfg.log.every, device=run.info.device)]
    metrics = {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
    train_time, samples = 0.0, 0
    while state.epoch < cfg.train.epochs:
        t0, step0 = time.perf_counter(), state.step
        run.train_loader.set_epoch(state.epoch, state.sample_in_epoch)
        run.monitor.start_epoch(state)
        stopped = None
        try:
            train_one_epoch(run.step, run.train_loader, state, global_batch=run.global_batch,
                            log_every=cfg.log.every, callbacks=callbacks, accumulate=run.accumulate)
        except StopTraining as e:
            stopped = str(e)
        train_time += time.perf_counter() - t0
        samples += (state.step - step0) * run.global_batch
        run.monitor.end_epoch(state, time.perf_counter() - t0)
        if stopped == "signal":
            run.save(wait=True)
            log.warning("saved step %d; exiting with code %d for requeue", state.step, REQUEUE_EXIT_CODE)
            raise Requeue()
        if stopped:  # max_steps: save mid-epoch, evaluate for the summary
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
    run = build_run(cfg, info)
    metrics, train_time, samples = train_epochs(run, stop)
    return finish(run, metrics, wall_time=time.perf_counter() - t_start, train_time=train_time, samples=samples)
