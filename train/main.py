"""Entry point: config → distributed init → fit. Launch with torchrun (or slurm/submit.py).

    torchrun --nproc_per_node=8 train/main.py --config configs/imagenet_resnet50.yaml data.root=/data/imagenet
"""

from __future__ import annotations

import argparse
import os
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


# Exit codes (docs/reliability.md): 0 done; 1 non-finite loss or weights; 2 a user or input error
# (config, data, a refused or damaged checkpoint); 3 saved on a signal, start me again
# (train.trainer.REQUEUE_EXIT_CODE); 4 a checkpoint could not be written (checkpoint.on_error=stop,
# the previous one intact); 5 the run directory is held by another live run.
SAVE_FAILED_EXIT_CODE = 4
RUN_LOCKED_EXIT_CODE = 5


def fail(e: BaseException, code: int) -> None:
    """One `error:` line on stderr and the exit code. An error decided on rank 0 and raised alike on
    every rank (`same_on_every_rank`) is printed by rank 0 only."""
    if not getattr(e, "same_on_every_rank", False) or os.environ.get("RANK", "0") == "0":
        print(f"error: {e}", file=sys.stderr)
    raise SystemExit(code) from None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        cfg = config_lib.load(args.config, args.overrides)  # fails before any process group exists
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from train.integrity import CheckpointError, CheckpointSaveError
    from train.monitor import setup_logging
    from train.runlock import RunLocked, hold
    from train.trainer import NonFiniteLoss, fit

    try:
        with distributed.process_group(cfg.dist, cfg.run_dir) as info:
            setup_logging(info.rank)  # the lock's warnings are logged like the run's
            with hold(cfg.run_dir, info):  # one run per run directory (train/runlock.py)
                return fit(cfg, info)
    except (config_lib.ConfigError, DataError, FileNotFoundError, CheckpointError) as e:  # found after start-up
        fail(e, 2)
    except NonFiniteLoss as e:
        fail(e, 1)
    except CheckpointSaveError as e:
        fail(e, SAVE_FAILED_EXIT_CODE)
    except RunLocked as e:
        fail(e, RUN_LOCKED_EXIT_CODE)


if __name__ == "__main__":
    main()
