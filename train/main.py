"""Entry point: config → distributed init → fit. Launch with torchrun (or slurm/submit.py).

    torchrun --nproc_per_node=8 train/main.py --config configs/imagenet_resnet50.yaml data.root=/data/imagenet
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train/main.py` / torchrun: make `train` and `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import DataError  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import distributed  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a ResNet with DDP.")
    p.add_argument("--config", help="YAML recipe, e.g. configs/imagenet_resnet50.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.4 data.batch_size=64")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)  # fails before any process group exists
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from train.checkpoint import UnsafeCheckpoint
    from train.trainer import NonFiniteLoss, fit

    try:
        with distributed.process_group(cfg.dist) as info:
            return fit(cfg, info)
    except (config_lib.ConfigError, DataError, FileNotFoundError, UnsafeCheckpoint) as e:  # found after start-up
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
