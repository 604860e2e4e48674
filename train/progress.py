"""What a person watching a run sees: a tqdm bar on a terminal, plain log lines elsewhere (CI
and SLURM log files hold no carriage returns or escape sequences), nothing on other ranks."""

from __future__ import annotations

import datetime
import logging
import math
import os
import sys

log = logging.getLogger("resnet")


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
