"""Models by name: `build(cfg.model, num_classes)` → a ResNet, with weights and frozen stages.

As in torchvision, every architecture is also a function of its own name, generated from the
name table `ARCHS`: `train.models.resnet50(num_classes=10)` is `resnet("resnet50", 10)`.

`model.weights` is a local file: a torchvision state_dict, our export (`python -m train.export`)
or a dict holding one under "model". A classifier of another shape is left freshly initialised
(transfer learning); any other mismatch is an error naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from train.config import ConfigError
from train.models.resnet import (
    ARCHS,
    BasicBlock,
    Bottleneck,
    PreActBlock,
    PreActBottleneck,
    ResNet,
    ShortcutA,
    SqueezeExcite,
    resnet,
)

log = logging.getLogger("resnet")


def _factory(name: str) -> Callable[..., ResNet]:
    def make(*, num_classes: int = 1000, **overrides) -> ResNet:
        return resnet(name, num_classes, **overrides)

    block, layers, kwargs = ARCHS[name]
    make.__name__ = make.__qualname__ = name
    make.__module__ = __name__
    make.__doc__ = (f"{name}: {block.__name__} x {layers}{f', {kwargs}' if kwargs else ''}; `overrides` "
                    "(stem, shortcut, zero_init_residual, stride_in_1x1, se, ...) replace the defaults.")
    return make


globals().update({name: _factory(name) for name in ARCHS})
__all__ = ["ARCHS", "BasicBlock", "Bottleneck", "PreActBlock", "PreActBottleneck", "ResNet", "ShortcutA",
           "SqueezeExcite", "build", "load_weights", "resnet", *ARCHS]


def load_weights(model: nn.Module, path: str) -> list[str]:
    """Load `path` into `model`; returns the keys left at their initial values (the classifier)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"model.weights: file '{path}' not found") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise ConfigError(f"model.weights: cannot read '{path}': {str(e).splitlines()[0]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    own = model.state_dict()
    skipped = [k for k in ("fc.weight", "fc.bias") if k in sd and k in own and sd[k].shape != own[k].shape]
    for k in skipped:
        del sd[k]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise ConfigError(f"model.weights: '{path}' does not fit this model "
                          f"({len(missing)} missing keys e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. "
                          f"{unexpected[:2]}); check model.name")
    if skipped:
        log.info("model.weights: loaded %s; new classifier for %d classes (%s)", path, own["fc.weight"].shape[0],
                 ", ".join(skipped))
    return skipped


def build(cfg, num_classes: int) -> ResNet:
    """The model `cfg.name` with the config's stem, shortcut, init, weights and frozen stages."""
    overrides = {"zero_init_residual": cfg.zero_init_residual}
    if cfg.stem != "auto":
        overrides["stem"] = cfg.stem
    if cfg.shortcut != "auto":
        overrides["shortcut"] = cfg.shortcut
    if cfg.stride_in_1x1:
        overrides["stride_in_1x1"] = True
    if cfg.se:  # squeeze-and-excitation on any name; seresnet* have it already
        overrides["se"] = True
    try:
        model = resnet(cfg.name, num_classes, **overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.weights:
        load_weights(model, cfg.weights)
        if cfg.new_classifier:  # new classes: the old head's rows mean other things
            model.fc.reset_parameters()
        log.info("model.weights: loaded %s%s", cfg.weights, "; classifier re-initialised" if cfg.new_classifier else "")
    if cfg.freeze_stages:
        try:
            model.freeze(cfg.freeze_stages)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return model
