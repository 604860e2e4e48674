"""The run's result: a dict the trainer fills, written to `<run>/summary.json` and printed as a
table by rank 0 at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from train.progress import hms


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
