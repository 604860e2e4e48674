"""Evaluate trained weights on a validation split: exact counts on any number of ranks.

    python -m train.evaluate runs/fashion_mnist_resnet                  # the run's config and newest checkpoint
    python -m train.evaluate runs/x/checkpoints/step_2340 --ema         # one checkpoint, its EMA weights
    python -m train.evaluate resnet50.pth --config configs/imagenet_resnet50.yaml data.root=/data/imagenet
    torchrun --nproc_per_node=8 -m train.evaluate runs/x --sizes 232:224,256:224 --tta   # FixRes sweep

Users of torchvision (`--test-only`), timm (`validate.py`) and pytorch/examples (`--evaluate`)
expect this. `--sizes` sweeps (val_resize, val_crop) pairs in one call (torchvision's V2 weights
train at 176 px and are evaluated at 232/224); `--tta` adds horizontal-flip test-time
augmentation. Prints one row per setting and returns them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from data import DataError, build_val_loader  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import distributed, hardware, models  # noqa: E402
from train.checkpoint import saved  # noqa: E402
from train.export import checkpoint_dir, model_state_dict  # noqa: E402
from train.integrity import CheckpointError, short_reason  # noqa: E402
from train.trainer import evaluate  # noqa: E402


def parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or p[0] < p[1] or p[1] <= 0 for p in pairs):
        raise config_lib.ConfigError(f"--sizes: '{text}' is not a list of resize:crop pairs with resize >= crop")
    return pairs


def weights(source: Path, ema: bool) -> dict[str, torch.Tensor]:
    """A run directory, a checkpoint directory or a torchvision-format .pth file."""
    if source.is_file():
        if ema:
            raise config_lib.ConfigError("--ema: needs a run or checkpoint directory, not a .pth file")
        try:
            sd = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickled code, or not a torch file at all
            raise CheckpointError(f"'{source}' is not a plain weights file; refusing to unpickle it "
                                  f"({short_reason(e)})") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"'{source}' holds a {type(sd).__name__}, not a state_dict")
        return sd.get("model", sd)
    return model_state_dict(source, "ema.module" if ema else "model")


def run_config(source: Path, config: str | None, overrides: list[str]) -> config_lib.Config:
    """`--config` if given; else the config.yaml saved in the run directory of `source`."""
    if config is None:
        run = source if (source / "config.yaml").is_file() else checkpoint_dir(source).parent.parent
        if not (run / "config.yaml").is_file():
            raise config_lib.ConfigError(f"--config: not given and no config.yaml in '{run}'")
        config = str(run / "config.yaml")
    return config_lib.load(config, overrides)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path, help="run directory, checkpoint directory (step_<n>) or .pth")
    p.add_argument("--config", help="recipe YAML (default: the run's saved config.yaml)")
    p.add_argument("--sizes", help="resize:crop pairs, e.g. 232:224,256:224 (default: the config's)")
    p.add_argument("--tta", action="store_true", help="also evaluate with horizontal-flip TTA")
    p.add_argument("--ema", action="store_true", help="the checkpoint's EMA weights")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.root=/data/imagenet")
    args = p.parse_intermixed_args(argv)
    try:
        if not args.source.exists() or (args.source.is_dir() and not saved(args.source)
                                        and not (args.source / "checkpoints").is_dir()):
            raise config_lib.ConfigError(f"source: '{args.source}' is no run, checkpoint or weights file")
        cfg = run_config(args.source, args.config, [*args.overrides, "train.resume=off"])
        sizes = parse_sizes(args.sizes) if args.sizes else [(cfg.data.val_resize, cfg.data.val_crop)]
        with distributed.process_group(cfg.dist) as info:
            return sweep(cfg, info, weights(args.source, args.ema), sizes, args.tta)
    except (config_lib.ConfigError, DataError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def sweep(cfg, info, state: dict, sizes: list[tuple[int, int]], tta: bool) -> list[dict]:
    rows = []
    model = None
    for resize, crop in sizes:
        data = dataclasses.replace(cfg.data, val_resize=resize, val_crop=crop)
        val, classes = build_val_loader(data, info, seed=cfg.train.seed, channels_last=cfg.model.channels_last)
        if model is None:
            model = models.build(dataclasses.replace(cfg.model, weights=""), cfg.data.num_classes or len(classes))
            model.load_state_dict(state)
            model = model.to(info.device)
            if cfg.model.channels_last:
                model = model.to(memory_format=torch.channels_last)
            amp = cfg.train.amp if cfg.train.amp != "auto" else (
                hardware.cuda_amp(torch.cuda.get_device_capability(info.device))[0]
                if info.device.type == "cuda" else "off")
        for flip in (False, True) if tta else (False,):
            m = evaluate(model, val, nn.CrossEntropyLoss(), amp, hflip_tta=flip)
            rows.append({"val_resize": resize, "val_crop": crop, "tta": flip, **m})
    if info.is_main:
        print(f"{'resize':>6} {'crop':>5} {'tta':>5} {'top1':>7} {'top5':>7} {'loss':>7} {'images':>7}")
        for r in rows:
            print(f"{r['val_resize']:>6} {r['val_crop']:>5} {'flip' if r['tta'] else '-':>5} {r['top1']:7.2f} "
                  f"{r['top5']:7.2f} {r['loss']:7.4f} {r['count']:>7}")
    return rows


if __name__ == "__main__":
    main()
