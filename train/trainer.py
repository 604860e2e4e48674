"""fit(): build everything from the config, resume, then epochs of train → evaluate → checkpoint.

`Hooks` is what the loop calls after each step: metrics to the monitor, checkpoints every N
steps, `train.max_steps`, and the stop-and-save on SIGUSR1/SIGTERM that SLURM sends before a
preemption or the time limit. Ranks agree on a stop at the logging interval (one tiny
all-reduce), so a signal that reached only some ranks still stops all of them at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from data import build_loaders
from train import config as config_lib
from train import hardware, models, sync_batchnorm
from train.checkpoint import Checkpointer, find_resume
from train.distributed import DistInfo, all_reduce_sum, seed_everything
from train.loop import NonFiniteLoss, StopTraining, TrainState, evaluate, train_one_epoch
from train.monitor import Monitor, setup_logging
from train.optim import build_optimizer, build_scheduler

log = logging.getLogger("resnet")
REQUEUE_EXIT_CODE = 3  # "saved on a signal; start me again" (slurm/ and torchrun restarts use it)


class Requeue(SystemExit):
    def __init__(self):
        super().__init__(REQUEUE_EXIT_CODE)


class StopSignal:
    """SIGUSR1/SIGTERM set a flag instead of killing the process; installed first thing in fit()
    so that a signal arriving while the run starts up is not lost either."""

    def __init__(self):
        self.received = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        log.warning("received %s: will save a checkpoint and exit for requeue", signal.Signals(signum).name)
        self.received = True


class Hooks:
    def __init__(self, cfg, info: DistInfo, monitor: Monitor, save, global_batch: int,
                 stop: StopSignal, before_forward=lambda: None):
        self.cfg, self.info, self.monitor, self.save = cfg, info, monitor, save
        self.before_forward = before_forward
        self.world_size, self.global_batch = info.world_size, global_batch
        self.stop = stop

    def on_batch(self, state: TrainState, images: torch.Tensor) -> None:
        self.before_forward()
        self.monitor.on_batch(state, images)

    def after_backward(self, state: TrainState) -> None:
        self.monitor.after_backward(state)

    def log_train(self, state: TrainState, **metrics) -> None:
        self.monitor.log_train(state, global_batch=self.global_batch, **metrics)

    def stop_requested(self) -> bool:
        flag = torch.tensor([float(self.stop.received)], device=self.info.device)
        return all_reduce_sum(flag).item() > 0

    def save_due(self, state: TrainState) -> bool:
        """A checkpoint follows this step: the loop checks the loss for NaN/inf first."""
        every, max_steps = self.cfg.checkpoint.every_steps, self.cfg.train.max_steps
        return bool(every and state.step % every == 0) or bool(max_steps and state.step >= max_steps)

    def after_step(self, state: TrainState) -> None:
        every = self.cfg.checkpoint.every_steps
        if every and state.step % every == 0:
            self.save(state)
        if self.cfg.train.max_steps and state.step >= self.cfg.train.max_steps:
            raise StopTraining("max_steps")
        if state.step % self.cfg.log.every == 0 and self.stop_requested():
            raise StopTraining("signal")


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
    return bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all())


def set_threads(cfg, info: DistInfo) -> int:
    """Intra-op threads from this rank's share of the CPUs (torchrun's OMP_NUM_THREADS=1 would
    leave the rest idle); an OMP_NUM_THREADS other than torchrun's 1 is the user's and is kept."""
    user = os.environ.get("OMP_NUM_THREADS", "1")
    workers = cfg.data.workers if cfg.data.loader == "torch" else 0  # DALI's threads wait on the GPU or I/O
    threads = int(user) if user != "1" and not cfg.dist.cpu_threads else hardware.cpu_threads(
        cfg.dist.cpu_threads, info.local_world_size, workers)
    torch.set_num_threads(threads)
    return threads


def choose_amp(cfg, info: DistInfo, bare: nn.Module) -> str:
    """train.amp, with `auto` decided by the hardware (train/hardware.py); logged in one line."""
    def mean_over_ranks(values: list[float]) -> list[float]:
        t = all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=info.device))
        return (t / info.world_size).tolist()

    key = (f"{cfg.model.name}|batch {cfg.data.batch_size}|crop {cfg.data.train_crop}|channels_last "
           f"{cfg.model.channels_last}|threads {torch.get_num_threads()}|ranks/node {info.local_world_size}")
    amp, why = hardware.choose_amp(
        cfg.train.amp, info.device, key=key, reduce=mean_over_ranks, write_cache=info.local_rank == 0,
        measure=lambda: hardware.probe(bare, cfg.data.batch_size, cfg.data.train_crop, cfg.model.channels_last))
    if info.device.type == "cuda":
        hardware.allow_tf32()
    log.info("amp %s: %s", amp, why)
    return amp


def fit(cfg: config_lib.Config, info: DistInfo) -> dict:
    stop = StopSignal()
    setup_logging(info.rank)
    t_start = time.perf_counter()
    seed_everything(cfg.train.seed, info.rank, cfg.train.deterministic)
    torch.backends.cudnn.benchmark = not cfg.train.deterministic
    run_dir = cfg.run_dir
    if info.is_main:
        config_lib.save(cfg, run_dir / "config.yaml")
    threads = set_threads(cfg, info)
    log.info("%s; %d intra-op threads per rank", hardware.machine_header(info.device), threads)

    train_loader, val_loader, classes = build_loaders(cfg.data, info, seed=cfg.train.seed,
                                                      channels_last=cfg.model.channels_last)
    num_classes = cfg.data.num_classes or len(classes)
    model, bare = build_model(cfg, num_classes, info)
    amp = choose_amp(cfg, info, bare)
    global_batch = cfg.data.batch_size * info.world_size
    steps_per_epoch = train_loader.steps_per_epoch
    optimizer = build_optimizer(cfg.optim, model, global_batch)
    scheduler = build_scheduler(cfg.schedule, optimizer, steps_per_epoch, cfg.train.epochs)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()

    ckpt = Checkpointer(run_dir, info.rank, info.world_size, cfg.checkpoint.keep,
                        cfg.checkpoint.async_save, cfg.checkpoint.keep_best)
    state = TrainState()
    resume_from = find_resume(cfg.train.resume, run_dir)
    if resume_from is not None:
        state = ckpt.load(resume_from, bare, optimizer, scheduler, scaler)
        log.info("resumed from %s: epoch %d, step %d, %d samples into the epoch",
                 resume_from, state.epoch + 1, state.step, state.sample_in_epoch)
    config_dict = config_lib.to_dict(cfg)

    def save(st: TrainState, top1: float | None = None, wait: bool = False) -> None:
        sync_buffers(bare)
        if not all_finite(bare):  # the loss check trails the weights by one step
            raise NonFiniteLoss(f"non-finite weights at step {st.step}; lower optim.lr or set "
                                "optim.grad_clip; the last checkpoint is intact")
        ckpt.save(bare, optimizer, scheduler, scaler, st, config_dict, top1)
        if wait:
            ckpt.wait()

    def validate() -> dict[str, float]:
        sync_buffers(bare)
        return evaluate(bare, val_loader, eval_criterion, amp)

    monitor = Monitor(run_dir, info.is_main, info.world_size, steps_per_epoch, cfg.train.epochs,
                      cfg.log.progress, cfg.log.tensorboard, opts=cfg.log, mean=cfg.data.mean, std=cfg.data.std,
                      max_steps=cfg.train.max_steps)
    monitor.watch(bare, val_loader, scaler)  # rank 0: norms, feature-map probe image, graph
    monitor.text("config", "```\n" + (run_dir / "config.yaml").read_text() + "\n```" if info.is_main else "")
    hooks = Hooks(cfg, info, monitor, save, global_batch, stop, before_forward=ckpt.wait_staged)
    log.info("%s on %d x %s, %d classes, global batch %d, %d steps/epoch, amp %s",
             cfg.model.name, info.world_size, info.device.type, num_classes, global_batch, steps_per_epoch, amp)

    metrics = {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
    train_time, samples = 0.0, 0
    while state.epoch < cfg.train.epochs:
        t0, step0 = time.perf_counter(), state.step
        train_loader.set_epoch(state.epoch, state.sample_in_epoch)
        monitor.start_epoch(state.epoch, state.sample_in_epoch // global_batch, state.step)
        stopped = None
        try:
            train_one_epoch(model, train_loader, optimizer, scheduler, scaler, criterion, state, amp,
                            cfg.optim.grad_clip, cfg.log.every, hooks)
        except StopTraining as e:
            stopped = str(e)
        train_time += time.perf_counter() - t0
        samples += (state.step - step0) * global_batch
        monitor.end_epoch(state, time.perf_counter() - t0)
        if stopped == "signal":
            save(state, wait=True)
            log.warning("saved step %d; exiting with code %d for requeue", state.step, REQUEUE_EXIT_CODE)
            raise Requeue()
        if stopped:  # max_steps: save mid-epoch, evaluate for the summary
            save(state)
            metrics = validate()
            monitor.log_eval(state, metrics)
            break
        state.epoch, state.sample_in_epoch = state.epoch + 1, 0
        last = state.epoch == cfg.train.epochs
        top1 = None
        if state.epoch % cfg.train.eval_every == 0 or last:
            metrics = validate()
            monitor.log_eval(state, metrics)
            top1 = metrics["top1"]
            state.best_top1 = max(state.best_top1, top1)
        if state.epoch % cfg.checkpoint.every_epochs == 0 or last:
            save(state, top1)
    ckpt.close()
    if metrics["top1"] != metrics["top1"]:  # resumed after the last epoch: nothing evaluated yet
        metrics = validate()
    if train_loader.skipped:
        log.warning("%d unreadable training images were skipped (see warnings above)", train_loader.skipped)
    summary = {
        "final_top1": metrics["top1"], "final_top5": metrics["top5"], "final_val_loss": metrics["loss"],
        "best_top1": max(state.best_top1, metrics["top1"]), "epochs": state.epoch, "steps": state.step,
        "wall_time_s": time.perf_counter() - t_start, "train_images_per_s": samples / max(train_time, 1e-9),
        "world_size": info.world_size, "device": info.device.type, "command": " ".join(sys.argv),
        "config": config_dict,
    }
    monitor.summary(summary)
    monitor.close()
    return summary
