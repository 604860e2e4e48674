"""Monitoring overhead: images/s of the trainer step with TensorBoard monitoring at the default
intervals (scalars every `log.every`, per-stage gradient/weight norms every `log.grad_norm_every`,
the input grid) against monitoring switched off, same model, batch and synthetic data.

    python benchmarks/monitor.py                         # CPU: small ResNet, 32x32
    python benchmarks/monitor.py --model resnet50 --batch 256 --size 224 --amp fp16   # GPU

Runs alternate (off, on, off, on, ...); the ratio of medians is printed last. Goal: >= 0.97.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_step import arguments, monitor, setup, trainer  # noqa: E402
from train.config import Config  # noqa: E402
from train.hardware import machine_header  # noqa: E402


def main() -> None:
    args = arguments(__doc__, steps=100).parse_args()
    cfg = Config()  # default log intervals: what a user gets
    with tempfile.TemporaryDirectory() as tmp:
        b = setup(args, cfg, Path(tmp))
        device = b.device
        print(machine_header(device))
        on = monitor(cfg, args, b.info, Path(tmp))
        on.watch(b.bare, None, b.run.scaler)
        off = monitor(cfg, args, b.info, Path(tmp) / "off", tensorboard=False)
        monitors = {"on": on, "off": off}
        times: dict[str, list[float]] = {"on": [], "off": []}
        for r in range(args.repeats + 1):  # the first round warms both paths up
            for name in ("off", "on"):
                t = trainer(b.run, monitors[name])
                if r:
                    times[name].append(t)
        on.close()
        off.close()
    n = args.batch * args.steps
    ips = {k: n / statistics.median(v) for k, v in times.items()}
    print(f"device {device}, {args.model}, batch {args.batch}, {args.size}px, amp {args.amp}, "
          f"{args.steps} steps x {args.repeats} repeats, log.every {cfg.log.every}, "
          f"grad_norm_every {cfg.log.grad_norm_every}")
    print(f"monitoring off  {ips['off']:10.1f} img/s")
    print(f"monitoring on   {ips['on']:10.1f} img/s")
    print(f"on/off ratio: {ips['on'] / ips['off']:.3f}")


if __name__ == "__main__":
    main()
