"""Export a run's checkpoint as one torchvision-compatible state_dict file.

    python -m train.export runs/imagenet_resnet50 resnet50.pth            # the newest checkpoint
    python -m train.export runs/imagenet_resnet50/checkpoints/step_12000 resnet50.pth   # one checkpoint
    python -m train.export runs/imagenet_resnet50 resnet50_ema.pth --ema   # the weight EMA (train/optim.py)

The file loads with `torch.load(path, weights_only=True)` into torchvision's model of the same
name (keys and shapes are torchvision's) and back into ours with `model.weights=resnet50.pth`.
It reads every shard, so this works whatever the number of ranks that saved. Every file is checked
against the checkpoint's manifest first: a damaged checkpoint is refused in one line, exit code 2
(docs/reliability.md), and nothing in it is unpickled but plain tensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from train.checkpoint import load_tensors, newest_saved, saved
from train.integrity import CheckpointError


def checkpoint_dir(run_or_ckpt: Path) -> Path:
    """A checkpoint directory itself, or the newest complete one of a run directory (the newest
    without a manifest where none has one)."""
    path = Path(run_or_ckpt)
    if saved(path):
        return path
    found = newest_saved(path / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in '{path}' or '{path / 'checkpoints'}'")
    return found


def model_state_dict(run_or_ckpt: Path, state: str = "model") -> dict[str, torch.Tensor]:
    """The weights saved as named state `state` (model, or ema) from all shards, on the CPU; only
    tensors are read, so no pickled value in the checkpoint is ever unpickled."""
    return {k: v.contiguous() for k, v in load_tensors(checkpoint_dir(run_or_ckpt), f"{state}.").items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="run directory or one checkpoint directory (step_<n>)")
    p.add_argument("out", type=Path)
    p.add_argument("--ema", action="store_true", help="the EMA weights (optim.ema_decay), saved as ema.module.*")
    args = p.parse_args(argv)
    try:
        sd = model_state_dict(args.run, "ema.module" if args.ema else "model")
    except (FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, args.out)
    print(f"wrote {args.out}: {len(sd)} tensors")


if __name__ == "__main__":
    main()
