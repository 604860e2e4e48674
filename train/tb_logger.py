"""TensorBoard writer of rank 0: logs whatever dict of scalars it is given.

A new metric reaches TensorBoard by being in the dict (torchtitan's `BaseLogger.log(metrics,
step)`); nothing here lists tags. On other ranks, or with `log.tensorboard: false`, every call is
a no-op, so callers never test the rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from train import tb_visuals as vis


class TensorBoardLogger:
    def __init__(self, log_dir: Path, *, enabled: bool):
        self.log_dir, self.writer = Path(log_dir), None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One scalar per entry, tag = key (e.g. "train/loss")."""
        if self.writer is not None:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, value: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, value, 0)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step)

    def graph(self, model: torch.nn.Module, example: torch.Tensor) -> str | None:
        """The model graph; returns why it was skipped, or None."""
        return vis.add_graph(self.writer, model, example) if self.writer is not None else "tensorboard is off"

    def hparams(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        if self.writer is not None:
            vis.add_hparams(self.writer, hparams, metrics, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
