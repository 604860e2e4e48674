"""Progressive resizing (FFCV-style): the resolution of each epoch, and both loaders following it."""

from dataclasses import replace

import pytest
import torch

from data import torch_loader
from data.sampler import train_crop_at
from tests.conftest import make_image_folder
from train.config import ConfigError, DataConfig, load
from train.distributed import DistInfo

CPU = torch.device("cpu")
ONE = DistInfo(0, 1, 0, CPU)


def test_resolution_schedule_steps_of_32():
    cfg = DataConfig(train_crop=192, progressive_min_crop=128, progressive_start_epoch=2, progressive_end_epoch=10)
    got = [train_crop_at(cfg, e) for e in range(12)]
    # linear 128 → 192 over epochs 2..10, rounded to multiples of 32 (FFCV's get_resolution)
    assert got == [128, 128, 128, 128, 128, 160, 160, 160, 192, 192, 192, 192]  # round half to even
    assert train_crop_at(DataConfig(train_crop=224), 0) == 224  # off by default


def test_bad_progressive_config_is_one_line():
    with pytest.raises(ConfigError, match="data.progressive_min_crop"):
        load(None, ["data.root=.", "data.train_crop=64", "data.progressive_min_crop=96"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("prog"), classes=2, train_per_class=8, val=4, size=40)


def cfg_for(root, **kw):
    return replace(DataConfig(root=str(root), batch_size=4, workers=0, train_crop=32, val_resize=32, val_crop=32,
                              progressive_min_crop=16, progressive_start_epoch=0, progressive_end_epoch=2), **kw)


def shapes(loader, epoch):
    loader.set_epoch(epoch)
    return {tuple(x.shape[2:]) for x, _ in loader}


def test_torch_loader_follows_the_schedule(folder):
    train, val, _ = torch_loader.build(cfg_for(folder), ONE, seed=0, channels_last=False)
    assert shapes(train, 0) == {(16, 16)} and shapes(train, 2) == {(32, 32)}
    assert {tuple(x.shape[2:]) for x, _ in val} == {(32, 32)}  # evaluation stays at val_crop


@pytest.mark.dali
def test_dali_loader_follows_the_schedule(folder, tmp_path, monkeypatch):
    pytest.importorskip("nvidia.dali")
    from data import dali

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = cfg_for(folder, loader="dali", dali_device="cpu", workers=1)
    train, val, _ = dali.build(cfg, ONE, seed=0, channels_last=False)
    assert shapes(train, 0) == {(16, 16)}
    assert shapes(train, 1) == {(32, 32)}  # epoch 1: 16 + 16/2 = 24 → rounds to 32
    assert {tuple(x.shape[2:]) for x, _ in val} == {(32, 32)}
