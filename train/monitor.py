"""What a user sees of a run: TensorBoard scalars, a progress line or bar, and the final summary.

Only rank 0 writes; every value it writes was already reduced across ranks by the loop. On a
terminal rank 0 draws a tqdm bar; in a file (CI, SLURM logs) it prints plain lines, so logs hold
no carriage returns.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("resnet")


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)


class Monitor:
    def __init__(self, run_dir: Path, is_main: bool, world_size: int, steps_per_epoch: int,
                 epochs: int, progress: str = "auto", tensorboard: bool = True):
        self.run_dir, self.is_main, self.world_size = run_dir, is_main, world_size
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.writer = None
        if is_main and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
        if progress == "auto":
            progress = "bar" if sys.stdout.isatty() else "lines"
        self.progress = progress if is_main else "off"
        self.bar = None
        self.start_time = time.perf_counter()
        self._mark = (time.perf_counter(), 0)  # (time, global step) of the last log point
        self.images_per_s = 0.0
        self.samples_seen = 0

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, value: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value, 0)

    def start_epoch(self, epoch: int, start_step_in_epoch: int, step: int) -> None:
        self._mark = (time.perf_counter(), step)
        if self.progress == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=self.steps_per_epoch, initial=start_step_in_epoch,
                            desc=f"epoch {epoch + 1}/{self.epochs}", dynamic_ncols=True, leave=False)

    def on_batch(self, state, images) -> None:
        """Called with every training batch before the forward pass (e.g. an input grid at step 0)."""

    def after_backward(self, state) -> None:
        """Called after backward, before the optimizer step (gradient statistics)."""

    def log_train(self, state, loss: float, top1: float, lr: float, global_batch: int,
                  data_time: float = 0.0, loss_scale: float = 1.0) -> None:
        now = time.perf_counter()
        t0, s0 = self._mark
        steps = state.step - s0 if s0 is not None else None
        self._mark = (now, state.step)
        if steps:
            self.images_per_s = steps * global_batch / (now - t0)
            self.samples_seen += steps * global_batch
            self.scalar("train/images_per_s", self.images_per_s, state.step)
            self.scalar("train/images_per_s_per_rank", self.images_per_s / self.world_size, state.step)
        self.scalar("train/loss", loss, state.step)
        self.scalar("train/top1", top1, state.step)
        self.scalar("train/lr", lr, state.step)
        in_epoch = state.step - state.epoch * self.steps_per_epoch
        if self.bar is not None:
            self.bar.n = in_epoch
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{self.images_per_s:.0f}", refresh=True)
        elif self.progress == "lines":
            log.info("epoch %d step %d/%d  loss %.4f  top1 %.2f  lr %.4g  %.0f img/s",
                     state.epoch + 1, in_epoch, self.steps_per_epoch, loss, top1, lr, self.images_per_s)

    def end_epoch(self, state, epoch_time: float) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.scalar("time/epoch_s", epoch_time, state.step)

    def log_eval(self, state, metrics: dict[str, float]) -> None:
        for k in ("loss", "top1", "top5"):
            self.scalar(f"val/{k}", metrics[k], state.step)
        log.info("epoch %d  val loss %.4f  top1 %.2f  top5 %.2f  (%d images)", state.epoch + 1,
                 metrics["loss"], metrics["top1"], metrics["top5"], metrics["count"])

    def summary(self, summary: dict) -> None:
        """Write summary.json and print the short table the demo ends with."""
        if not self.is_main:
            return
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        if self.writer is not None:
            self.writer.flush()
        rows = [("top-1 (final)", f"{summary['final_top1']:.2f} %"), ("top-5 (final)", f"{summary['final_top5']:.2f} %"),
                ("top-1 (best)", f"{summary['best_top1']:.2f} %"), ("epochs", str(summary["epochs"])),
                ("wall time", f"{summary['wall_time_s']:.0f} s"), ("train img/s", f"{summary['train_images_per_s']:.0f}")]
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
        print(f"tensorboard --logdir {self.run_dir / 'tb'}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
