"""What a user sees of a run: TensorBoard, a progress bar or plain lines, and the final summary.

Only rank 0 writes. The loss and accuracy it gets were reduced across ranks by the loop at the
logging interval (its one host sync); everything else the monitor reads is either the same on all
ranks (gradients after DDP's all-reduce, weights, learning rate) or rank 0's own clock.

TensorBoard, every `log.every` steps:
  train/loss, train/top1, train/lr, train/images_per_s (global), train/images_per_s_per_rank,
  train/data_wait_fraction (host time blocked on the loader / step time), train/step_time_s,
  train/peak_memory_gib (CUDA, peak since the last point), train/loss_scale (fp16)
every `log.grad_norm_every` steps: grad_norm/<stage>, weight_norm/<stage> (conv1, bn1, layer1.., fc)
every evaluation: val/loss, val/top1, val/top5, features/<stage> (+ features/input)
every epoch: time/epoch_s, time/eta_s, and with `log.histograms` weights/<param>, grads/<param>
once: train/inputs (de-normalised augmented batch), the graph, text config + command, and at the
end hparams/top1, hparams/top5, hparams/best_top1 with the HPARAMS session.

On a terminal rank 0 draws a tqdm bar (log lines are printed above it); otherwise it prints
plain lines, so files (CI, SLURM logs) hold no carriage returns or escape sequences.
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

import torch

from train import tb_visuals as vis
from train.config import LogConfig

log = logging.getLogger("resnet")


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


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


def hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class Monitor:
    def __init__(self, run_dir: Path, is_main: bool, world_size: int, steps_per_epoch: int,
                 epochs: int, progress: str = "auto", tensorboard: bool = True, *,
                 opts: LogConfig | None = None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 max_steps: int = 0):
        self.run_dir, self.is_main, self.world_size = Path(run_dir), is_main, world_size
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.opts = opts or LogConfig()
        self.mean, self.std = tuple(mean), tuple(std)
        self.total_steps = epochs * steps_per_epoch
        if max_steps:
            self.total_steps = min(self.total_steps, max_steps)
        self.writer = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        if progress == "auto":
            progress = "bar" if sys.stdout.isatty() and os.environ.get("TERM") != "dumb" else "lines"
        self.progress = progress if is_main else "off"
        self.bar = None
        self._redirect = None  # log lines go through tqdm.write while a bar is drawn
        self.start_time = time.perf_counter()
        self._mark = (time.perf_counter(), 0)  # (time, global step) of the last log point
        self._run_mark: tuple[float, int] | None = None  # (time, step) of this process's first step
        self.images_per_s = 0.0
        self.samples_seen = 0
        self.best_top5 = -1.0
        self.peak_memory_gib = 0.0
        # set by watch()
        self.model = None
        self.device = torch.device("cpu")
        self.scaler = None
        self.norms: vis.StageNorms | None = None
        self._pending_norms: list[tuple[int, torch.Tensor]] = []
        self.probe: torch.Tensor | None = None  # the fixed validation image for feature maps
        self._inputs_logged = self._probe_logged = False
        self.text("command", f"`{exact_command()}`")

    @property
    def _tb(self) -> bool:
        return self.writer is not None

    # -- what the trainer tells the monitor once --------------------------------------------------

    def watch(self, model: torch.nn.Module, val_loader=None, scaler=None) -> None:
        """The bare (unwrapped) model for norms, feature maps and the graph; the first validation
        image as the fixed probe; the GradScaler to unscale gradient norms and log its scale."""
        if not self.is_main:
            return
        self.model = vis.bare_module(model)
        with contextlib.suppress(StopIteration):
            self.device = next(self.model.parameters()).device
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        if not self._tb:
            return
        if self.opts.grad_norm_every > 0:
            self.norms = vis.StageNorms(self.model)
        if val_loader is not None and (self.opts.feature_maps or self.opts.graph):
            try:
                images, _ = next(iter(val_loader))
                self.probe = images[:1].detach().clone()
            except StopIteration:
                log.warning("tensorboard: the validation set is empty; no feature maps or graph")
        if self.opts.graph:
            if self.probe is None:
                log.warning("tensorboard: no graph (no validation image to trace it with)")
            else:
                reason = vis.add_graph(self.writer, self.model, self.probe)
                if reason:
                    log.warning("tensorboard: graph skipped: %s", reason)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, value: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value, 0)

    # -- per epoch ------------------------------------------------------------------------------

    def start_epoch(self, epoch: int, start_step_in_epoch: int, step: int) -> None:
        self._mark = (time.perf_counter(), step)
        if self._run_mark is None:
            self._run_mark = self._mark
        if self.progress == "bar":
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=self.steps_per_epoch, initial=start_step_in_epoch, file=sys.stdout,
                            desc=f"epoch {epoch + 1}/{self.epochs}", dynamic_ncols=True, leave=False,
                            unit="step")
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def eta(self, step: int) -> float:
        """Seconds left for the whole run at this process's average pace (evaluations included)."""
        if self._run_mark is None or step <= self._run_mark[1]:
            return math.nan
        t0, s0 = self._run_mark
        return (time.perf_counter() - t0) / (step - s0) * max(self.total_steps - step, 0)

    def end_epoch(self, state, epoch_time: float) -> None:
        self._close_bar()
        self.scalar("time/epoch_s", epoch_time, state.step)
        self.scalar("time/eta_s", self.eta(state.step), state.step)
        if self._tb and self.opts.histograms and self.model is not None:
            for name, p in self.model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), state.step)
                if p.grad is not None:
                    self.writer.add_histogram(f"grads/{name}", p.grad.detach().float().cpu(), state.step)

    # -- per step (called by the loop on every rank) ----------------------------------------------

    def on_batch(self, state, images) -> None:
        """Every training batch, before the forward: the augmented input grid, once."""
        if not self._inputs_logged and self._tb and self.opts.images:
            self._inputs_logged = True
            self.writer.add_image("train/inputs", vis.input_grid(images, self.mean, self.std), state.step)

    def after_backward(self, state) -> None:
        """After backward, before the optimizer step: per-stage gradient and weight norms on the
        device every `grad_norm_every` steps; they are read at the next logging point."""
        if self.norms is not None and (state.step + 1) % self.opts.grad_norm_every == 0:
            scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
            self._pending_norms.append((state.step + 1, self.norms.compute(scale)))

    def _write_norms(self) -> None:
        if not self._pending_norms:
            return
        steps = [s for s, _ in self._pending_norms]
        values = torch.stack([v for _, v in self._pending_norms]).tolist()  # one transfer
        self._pending_norms.clear()
        for step, row in zip(steps, values):
            for tag, v in zip(self.norms.tags(), row):
                self.writer.add_scalar(tag, v, step)

    def log_train(self, state, loss: float, top1: float, lr: float, global_batch: int,
                  data_time: float = 0.0, loss_scale: float = 1.0) -> None:
        if not self.is_main:
            return
        now = time.perf_counter()
        t0, s0 = self._mark
        steps = state.step - s0
        self._mark = (now, state.step)
        step = state.step
        if steps > 0:
            elapsed = max(now - t0, 1e-9)
            self.images_per_s = steps * global_batch / elapsed
            self.samples_seen += steps * global_batch
            self.scalar("train/images_per_s", self.images_per_s, step)
            self.scalar("train/images_per_s_per_rank", self.images_per_s / self.world_size, step)
            self.scalar("train/step_time_s", elapsed / steps, step)
            self.scalar("train/data_wait_fraction", min(data_time / elapsed, 1.0), step)
        self.scalar("train/loss", loss, step)
        self.scalar("train/top1", top1, step)
        self.scalar("train/lr", lr, step)
        if self.scaler is not None:
            self.scalar("train/loss_scale", loss_scale, step)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
            self.peak_memory_gib = max(self.peak_memory_gib, peak)
            self.scalar("train/peak_memory_gib", peak, step)
        if self._tb:
            self._write_norms()
        in_epoch = step - state.epoch * self.steps_per_epoch
        eta = self.eta(step)
        if self.bar is not None:
            self.bar.n = in_epoch
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{self.images_per_s:.0f}", eta=hms(eta), refresh=True)
        elif self.progress == "lines":
            wait = f"  data {100 * data_time / max(now - t0, 1e-9):.0f}%" if steps > 0 else ""
            log.info("epoch %d/%d step %d/%d  loss %.4f  top1 %.2f  lr %.4g  %.0f img/s%s  eta %s",
                     state.epoch + 1, self.epochs, in_epoch, self.steps_per_epoch, loss, top1, lr,
                     self.images_per_s, wait, hms(eta))

    # -- evaluation and the end -------------------------------------------------------------------

    def log_eval(self, state, metrics: dict[str, float]) -> None:
        if not self.is_main:
            return
        for k in ("loss", "top1", "top5"):
            self.scalar(f"val/{k}", metrics[k], state.step)
        self.best_top5 = max(self.best_top5, metrics["top5"])
        log.info("step %d (epoch %.2f)  val loss %.4f  top1 %.2f  top5 %.2f  (%d images)", state.step,
                 state.step / self.steps_per_epoch, metrics["loss"], metrics["top1"], metrics["top5"],
                 metrics["count"])
        if self._tb and self.opts.feature_maps and self.probe is not None and self.model is not None:
            if not self._probe_logged:
                self._probe_logged = True
                self.writer.add_image("features/input", vis.input_grid(self.probe, self.mean, self.std),
                                      state.step)
            for name, grid in vis.feature_maps(self.model, self.probe).items():
                self.writer.add_image(f"features/{name}", grid, state.step)

    def summary(self, summary: dict) -> None:
        """Complete the trainer's summary, write summary.json and the HPARAMS session, print a table."""
        if not self.is_main:
            return
        final5 = summary.get("final_top5", math.nan)
        summary["best_top5"] = max(self.best_top5, final5) if final5 == final5 else self.best_top5
        summary["train_images_per_s_per_rank"] = summary.get("train_images_per_s", 0.0) / self.world_size
        summary["command"] = exact_command()  # shell-quoted, with the launcher
        if self.device.type == "cuda":
            summary["peak_memory_gib"] = self.peak_memory_gib
        if self._tb:
            summary["tensorboard"] = str(self.run_dir / "tb")
            extra = {"world_size": self.world_size, "global_batch": self._global_batch(summary)}
            vis.add_hparams(self.writer, vis.flat_hparams(summary.get("config", {}), extra),
                            {"top1": summary["final_top1"], "top5": summary["final_top5"],
                             "best_top1": summary["best_top1"]}, summary.get("steps", 0))
            self.writer.flush()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        rows = [("top-1 final / best", f"{summary['final_top1']:.2f} / {summary['best_top1']:.2f} %"),
                ("top-5 final / best", f"{summary['final_top5']:.2f} / {summary['best_top5']:.2f} %"),
                ("epochs", f"{summary['epochs']} ({summary.get('steps', 0)} steps)"),
                ("wall time", hms(summary["wall_time_s"])),
                ("train img/s", f"{summary['train_images_per_s']:.0f} ({summary['train_images_per_s_per_rank']:.0f}"
                                f" per rank x {self.world_size})")]
        if "peak_memory_gib" in summary:
            rows.append(("peak memory", f"{summary['peak_memory_gib']:.2f} GiB"))
        rows += [("summary", str(self.run_dir / "summary.json")), ("command", summary["command"])]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
        if self._tb:
            print(f"tensorboard --logdir {self.run_dir / 'tb'}")

    def _global_batch(self, summary: dict) -> int:
        batch = summary.get("config", {}).get("data", {}).get("batch_size", 0)
        return batch * self.world_size

    def close(self) -> None:
        self._close_bar()
        if self.writer is not None:
            self.writer.close()
