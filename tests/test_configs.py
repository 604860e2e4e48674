"""Every shipped recipe loads (keys exist, values valid) without its data; the recipes' numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from train import config
from train.optim import torchvision_decay_per_step

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    config.load(str(path), [], check_data=False)


def test_torchvision_recipe_ema_is_torchvisions_at_8_x_128():
    cfg = config.load(str(Path(CONFIGS[0]).parent / "imagenet_resnet50_tv2.yaml"), [], check_data=False)
    want = torchvision_decay_per_step(0.99998, 32, world_size=8, batch_size=cfg.data.batch_size,
                                      epochs=cfg.train.epochs)
    assert cfg.optim.ema_every == 32 and cfg.optim.ema_decay == pytest.approx(want, abs=1e-7)


@pytest.mark.parametrize("override, key", [
    ("data.mix_prob=1.5", "data.mix_prob"), ("data.mixup_alpha=-1", "data.mixup_alpha"),
    ("optim.ema_decay=1.0", "optim.ema_decay"), ("optim.ema_every=0", "optim.ema_every"),
    ("checkpoint.best_by=val_ema", "checkpoint.best_by")])
def test_mix_and_ema_keys_are_checked(override, key):
    with pytest.raises(config.ConfigError, match=key):
        config.load(None, [override], check_data=False)
