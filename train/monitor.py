"""Monitoring: what a person watching a run sees, and the summary it leaves.

- `Monitor` measures throughput and step time, stage norms, input and feature-map images, CUDA
  memory, and hands dicts to the three below (the pictures are drawn by train/tb_visuals.py).
- `vis.TensorBoardLogger` (train/tb_visuals.py) logs whatever dict of scalars it is given, tag =
  key (torchtitan's `BaseLogger.log(metrics, step)`): nothing lists tags; a no-op off rank 0.
- `Progress`: a tqdm bar on a terminal, plain log lines elsewhere (CI and SLURM log files hold no
  carriage returns or escape sequences), nothing on other ranks.
- `RunSummary`: the run's result, a dict the trainer fills, written to `<run>/summary.json` and
  printed as a table by rank 0 at the end.

Only rank 0 writes. The loss and accuracy it gets were reduced across ranks by the loop at the
logging interval (its one host sync); everything else it reads is either the same on all ranks
(gradients after DDP's all-reduce, weights, learning rate) or rank 0's own clock.

TensorBoard, every `log.every` steps:
  train/loss, train/top1, train/lr, train/images_per_s (global), train/images_per_s_per_rank,
  train/data_wait_fraction (host time blocked on the loader / step time), train/step_time_s,
  train/peak_memory_gib (CUDA, peak since the last point), train/loss_scale (fp16)
every `log.grad_norm_every` steps: grad_norm/<stage>, weight_norm/<stage> (conv1, bn1, layer1.., fc)
every evaluation: val/loss, val/top1, val/top5, features/<stage> (+ features/input)
every epoch: time/epoch_s, time/eta_s, and with `log.histograms` weights/<param>, grads/<param>
once: train/inputs (de-normalised augmented batch), the graph, text config + command, and at the
end hparams/top1, hparams/top5, hparams/best_top1 with the HPARAMS session.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from train import tb_visuals as vis

log = logging.getLogger("resnet")


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


# -- the progress display ---------------------------------------------------------------------------

def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
    def __init__(self, mode: str, *, enabled: bool, epochs: int, steps_per_epoch: int):
        """`mode`: auto (bar on a terminal, lines otherwise) | bar | lines | off."""
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() and os.environ.get("TERM") != "dumb" else "lines"
        self.mode = mode if enabled else "off"
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.bar = self._redirect = None  # log lines go through tqdm.write while a bar is drawn

    def start_epoch(self, epoch: int, done_steps: int) -> None:
        if self.mode != "bar":
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(total=self.steps_per_epoch, initial=done_steps, file=sys.stdout, unit="step",
                        desc=f"epoch {epoch + 1}/{self.epochs}", dynamic_ncols=True, leave=False)
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()

    def update(self, epoch: int, step_in_epoch: int, m: dict[str, float]) -> None:
        """`m`: loss, top1, lr, images_per_s, data_wait (fraction or nan), eta_s."""
        if self.bar is not None:
            self.bar.n = step_in_epoch
            self.bar.set_postfix(loss=f"{m['loss']:.3f}", img_s=f"{m['images_per_s']:.0f}", eta=hms(m["eta_s"]),
                                 refresh=True)
        elif self.mode == "lines":
            wait = f"  data {100 * m['data_wait']:.0f}%" if math.isfinite(m["data_wait"]) else ""
            log.info("epoch %d/%d step %d/%d  loss %.4f  top1 %.2f  lr %.4g  %.0f img/s%s  eta %s",
                     epoch + 1, self.epochs, step_in_epoch, self.steps_per_epoch, m["loss"], m["top1"], m["lr"],
                     m["images_per_s"], wait, hms(m["eta_s"]))

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


# -- the run summary --------------------------------------------------------------------------------

def exact_command() -> str:
    """The command line that started this run, shell-quoted: torchrun's own when launched by it
    (read from the parent process on Linux), otherwise `python <argv>`."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        with contextlib.suppress(OSError):
            parts = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
            parts = [p.decode(errors="replace") for p in parts if p]
            if parts:
                return shlex.join(parts)
    return shlex.join([Path(sys.executable).name, *sys.argv])


class RunSummary(dict):
    def __init__(self, run_dir: Path, *, is_main: bool):
        super().__init__(command=exact_command())
        self.run_dir, self.is_main = Path(run_dir), is_main

    def write(self) -> None:
        if not self.is_main:
            return
        (self.run_dir / "summary.json").write_text(json.dumps(self, indent=1))
        print(self.table())

    def table(self) -> str:
        s: dict[str, Any] = self
        world = s.get("world_size", 1)
        rows = [("top-1 final / best", f"{s['final_top1']:.2f} / {s['best_top1']:.2f} %"),
                ("top-5 final / best", f"{s['final_top5']:.2f} / {s.get('best_top5', s['final_top5']):.2f} %"),
                *([("top-1 EMA final", f"{s['final_ema_top1']:.2f} %")] if "final_ema_top1" in s else []),
                ("epochs", f"{s['epochs']} ({s.get('steps', 0)} steps)"),
                ("wall time", hms(s["wall_time_s"])),
                ("train img/s", f"{s['train_images_per_s']:.0f} ({s['train_images_per_s'] / world:.0f}"
                                f" per rank x {world})")]
        if "peak_memory_gib" in s:
            rows.append(("peak memory", f"{s['peak_memory_gib']:.2f} GiB"))
        rows += [("summary", str(self.run_dir / "summary.json")), ("command", s["command"])]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if "tensorboard" in s:
            lines.append(f"tensorboard --logdir {s['tensorboard']}")
        return "\n".join(lines)


# -- the monitor ------------------------------------------------------------------------------------


def scale_tensor(scaler) -> torch.Tensor | None:
    """The GradScaler's current scale as a device tensor. GradScaler has no public accessor for
    it: `get_scale()` returns a Python float, i.e. a host sync on every norm step."""
    return getattr(scaler, "_scale", None) if scaler is not None else None


class Monitor:
    def __init__(self, cfg, *, run_dir: Path, info, data, epochs: int, steps_per_epoch: int,
                 global_batch: int, max_steps: int = 0):
        """`cfg`: the `log` section; `data`: the `data` section (mean/std to show the inputs)."""
        self.cfg, self.run_dir, self.is_main, self.world = cfg, Path(run_dir), info.is_main, info.world_size
        self.mean, self.std = tuple(data.mean), tuple(data.std)
        self.epochs, self.steps_per_epoch, self.global_batch = epochs, steps_per_epoch, global_batch
        self.total_steps = min(epochs * steps_per_epoch, max_steps) if max_steps else epochs * steps_per_epoch
        self.tb = vis.TensorBoardLogger(self.run_dir / "tb", enabled=info.is_main and cfg.tensorboard)
        self.progress = Progress(cfg.progress, enabled=info.is_main, epochs=epochs, steps_per_epoch=steps_per_epoch)
        self._mark = (time.perf_counter(), 0)  # (time, global step) of the last log point
        self._run_mark: tuple[float, int] | None = None  # (time, step) of this process's first step
        self.best_top5 = -1.0
        self.peak_memory_gib = 0.0
        self.model, self.device, self.scaler = None, torch.device("cpu"), None  # set by watch()
        self.norms: vis.StageNorms | None = None
        self._pending_norms: list[tuple[int, torch.Tensor]] = []
        self.probe: torch.Tensor | None = None  # the fixed validation image for feature maps
        self._inputs_logged = self._probe_logged = False
        self._inputs: tuple[int, torch.Tensor] | None = None  # the first batch, drawn at the first flush
        self.tb.text("command", f"`{exact_command()}`")

    def watch(self, model: torch.nn.Module, val_loader=None, scaler=None) -> None:
        """The bare (unwrapped) model for norms, feature maps and the graph; the first validation
        image as the fixed probe; the GradScaler to unscale gradient norms and log its scale."""
        if not self.is_main:
            return
        self.model = vis.bare_module(model)
        with contextlib.suppress(StopIteration):
            self.device = next(self.model.parameters()).device
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if not self.tb.enabled:
            return
        if self.cfg.grad_norm_every > 0:
            self.norms = vis.StageNorms(self.model)
        if val_loader is not None and (self.cfg.feature_maps or self.cfg.graph):
            try:
                images, _ = next(iter(val_loader))
                self.probe = images[:1].detach().clone()
            except StopIteration:
                log.warning("tensorboard: the validation set is empty; no feature maps or graph")
        if self.cfg.graph:
            reason = self.tb.graph(self.model, self.probe) if self.probe is not None else "no validation image"
            if reason:
                log.warning("tensorboard: graph skipped: %s", reason)

    # -- per epoch ------------------------------------------------------------------------------

    def start_epoch(self, state) -> None:
        self._mark = (time.perf_counter(), state.step)
        if self._run_mark is None:
            self._run_mark = self._mark
        self.progress.start_epoch(state.epoch, state.sample_in_epoch // self.global_batch)

    def eta(self, step: int) -> float:
        """Seconds left for the whole run at this process's average pace (evaluations included)."""
        if self._run_mark is None or step <= self._run_mark[1]:
            return math.nan
        t0, s0 = self._run_mark
        return (time.perf_counter() - t0) / (step - s0) * max(self.total_steps - step, 0)

    def end_epoch(self, state, epoch_time: float) -> None:
        self.progress.end_epoch()
        self.tb.log({"time/epoch_s": epoch_time, "time/eta_s": self.eta(state.step)}, state.step)
        if self.tb.enabled and self.cfg.histograms and self.model is not None:
            for name, p in self.model.named_parameters():
                self.tb.histogram(f"weights/{name}", p, state.step)
                if p.grad is not None:
                    self.tb.histogram(f"grads/{name}", p.grad, state.step)

    # -- called by the step loop (every rank) ----------------------------------------------------------

    def log_inputs(self, state, images: torch.Tensor) -> None:
        """Keep the first augmented batch on the device; it is drawn at the first flush (a grid
        on the host here would wait for the device in the step)."""
        if not self._inputs_logged and self.tb.enabled and self.cfg.images:
            self._inputs_logged = True
            self._inputs = (state.step, images[:vis.GRID_IMAGES].detach().clone())

    def grad_norms(self, state) -> None:
        """Per-stage gradient and weight norms on the device every `grad_norm_every` steps; they
        are read at the next logging point."""
        if self.norms is not None and (state.step + 1) % self.cfg.grad_norm_every == 0:
            self._pending_norms.append((state.step + 1, self.norms.compute(scale_tensor(self.scaler))))

    def log_train(self, state, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        now, (t0, s0) = time.perf_counter(), self._mark
        steps, elapsed = state.step - s0, max(now - t0, 1e-9)
        self._mark = (now, state.step)
        scalars = {f"train/{k}": metrics[k] for k in metrics if k != "data_time"}
        speed = {"images_per_s": math.nan, "data_wait": math.nan}
        if steps > 0:
            speed = {"images_per_s": steps * self.global_batch / elapsed,
                     "data_wait": min(metrics.get("data_time", 0.0) / elapsed, 1.0)}
            scalars.update({"train/images_per_s": speed["images_per_s"],
                            "train/images_per_s_per_rank": speed["images_per_s"] / self.world,
                            "train/step_time_s": elapsed / steps, "train/data_wait_fraction": speed["data_wait"]})
        if self.scaler is not None:
            scalars["train/loss_scale"] = self.scaler.get_scale()
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak_memory_gib = max(self.peak_memory_gib, peak)
            scalars["train/peak_memory_gib"] = peak
        self.tb.log(scalars, state.step)
        if self._inputs is not None:
            self.tb.image("train/inputs", vis.input_grid(self._inputs[1], self.mean, self.std), self._inputs[0])
            self._inputs = None
        self._write_norms()
        self.progress.update(state.epoch, state.step - state.epoch * self.steps_per_epoch,
                             {**metrics, **speed, "eta_s": self.eta(state.step)})

    def _write_norms(self) -> None:
        if not self._pending_norms:
            return
        steps = [s for s, _ in self._pending_norms]
        values = torch.stack([v for _, v in self._pending_norms]).tolist()  # one transfer
        self._pending_norms.clear()
        for step, row in zip(steps, values):
            self.tb.log(dict(zip(self.norms.tags(), row)), step)

    # -- evaluation and the end -------------------------------------------------------------------

    def log_eval(self, state, metrics: dict[str, float], prefix: str = "val") -> None:
        if not self.is_main:
            return
        self.tb.log({f"{prefix}/{k}": metrics[k] for k in ("loss", "top1", "top5")}, state.step)
        if prefix == "val":  # the model's; val_ema (train/optim.py) has its own scalars
            self.best_top5 = max(self.best_top5, metrics["top5"])
        log.info("step %d (epoch %.2f)  %s loss %.4f  top1 %.2f  top5 %.2f  (%d images)", state.step,
                 state.step / self.steps_per_epoch, prefix, metrics["loss"], metrics["top1"], metrics["top5"],
                 metrics["count"])
        if (self.tb.enabled and self.cfg.feature_maps and self.probe is not None and self.model is not None
                and prefix == "val"):  # the trained model's feature maps, once per evaluation
            if not self._probe_logged:
                self._probe_logged = True
                self.tb.image("features/input", vis.input_grid(self.probe, self.mean, self.std), state.step)
            for name, grid in vis.feature_maps(self.model, self.probe).items():
                self.tb.image(f"features/{name}", grid, state.step)

    def finish(self, summary: RunSummary) -> None:
        """Add what only the monitor knows to the summary; write the HPARAMS session."""
        final5 = summary.get("final_top5", math.nan)
        summary["best_top5"] = max(self.best_top5, final5) if final5 == final5 else self.best_top5
        summary["train_images_per_s_per_rank"] = summary.get("train_images_per_s", 0.0) / self.world
        if self.device.type == "cuda":
            summary["peak_memory_gib"] = self.peak_memory_gib
        if self.tb.enabled:
            summary["tensorboard"] = str(self.tb.log_dir)
            extra = {"world_size": self.world, "global_batch": self.global_batch}
            self.tb.hparams(vis.flat_hparams(summary.get("config", {}), extra),
                            {"top1": summary["final_top1"], "top5": summary["final_top5"],
                             "best_top1": summary["best_top1"]}, summary.get("steps", 0))

    def close(self) -> None:
        self.progress.end_epoch()
        self.tb.close()
