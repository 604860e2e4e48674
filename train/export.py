"""Export a run's checkpoint as one torchvision-compatible state_dict file.

    python -m train.export runs/imagenet_resnet50 resnet50.pth [--checkpoint step_12000]

The file loads with `torch.load(path, weights_only=True)` into torchvision's model of the same
name (keys and shapes are torchvision's) and back into ours with `model.weights=resnet50.pth`.
DCP's own converter reads every shard, so this works whatever the number of ranks that saved.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from train.checkpoint import complete, latest


def load_checkpoint(path: Path) -> dict:
    """The whole checkpoint (all ranks' shards) as one nested dict, on the CPU."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ckpt.pt"
        dcp_to_torch_save(str(path), str(out))
        return torch.load(out, map_location="cpu", weights_only=False)


def model_state_dict(run_or_ckpt: Path) -> dict[str, torch.Tensor]:
    path = Path(run_or_ckpt)
    if not complete(path):
        found = latest(path / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint in '{path}' or '{path / 'checkpoints'}'")
        path = found
    ckpt = load_checkpoint(path)
    model = ckpt["model"]
    if isinstance(model, io.BytesIO):  # never the case for tensors; guards format changes
        raise ValueError(f"unexpected model format in {path}")
    return {k: v.contiguous() for k, v in model.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="run directory or one checkpoint directory (step_<n>)")
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    try:
        sd = model_state_dict(args.run)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, args.out)
    print(f"wrote {args.out}: {len(sd)} tensors")


if __name__ == "__main__":
    main()
