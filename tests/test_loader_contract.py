"""Every loader (torch, dali, synthetic) against the one contract of data/__init__.py: by
isinstance on the Protocols and by behaviour (device tensors, epoch length, mid-epoch resume,
exact validation counts, corrupt files replaced and counted)."""

import importlib.util

import pytest
import torch

from data import Loader, RankInfo, TrainLoader, ValLoader, build_loaders, build_val_loader
from tests.conftest import make_image_folder
from train.config import DataConfig
from train.distributed import DistInfo

CPU = torch.device("cpu")
HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
LOADERS = ["torch", pytest.param("dali", marks=[pytest.mark.dali, pytest.mark.skipif(not HAS_DALI, reason="no DALI")]),
           "synthetic"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # DALI's preflight cache out of ~/.cache


def config(root, loader, **kw):
    return DataConfig(**{**dict(root=str(root), loader=loader, dali_device="cpu", batch_size=8, workers=0,
                                train_crop=32, val_resize=32, val_crop=32, min_scale=0.5), **kw})


def build(cfg, rank=0, world=1, channels_last=True):
    return build_loaders(cfg, DistInfo(rank, world, 0, CPU), seed=0, channels_last=channels_last)


def close(*loaders):
    for loader in loaders:
        if hasattr(loader, "close"):  # DALI: stop the read-ahead pool and the pipeline
            loader.close()


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """2 classes x 8 train images (one of them undecodable) and 8 val images (one zero-byte)."""
    root = make_image_folder(tmp_path_factory.mktemp("corrupt"), classes=2, train_per_class=8, val=8)
    (root / "train" / "n00000001" / "00003.JPEG").write_bytes(b"not a JPEG\n" * 30)
    (root / "val" / "n00000000" / "00004.JPEG").write_bytes(b"")
    return root


def test_dist_info_is_a_rank_info():
    assert isinstance(DistInfo(0, 1, 0, CPU), RankInfo)
    assert not isinstance([], Loader) and not isinstance(object(), RankInfo)


@pytest.mark.parametrize("kind", LOADERS)
def test_loaders_satisfy_the_protocols(tiny_data, kind):
    train, val, classes = build(config(tiny_data, kind))
    assert isinstance(train, TrainLoader) and isinstance(val, ValLoader)
    assert classes == [f"n{c:08d}" for c in range(4)]
    close(train, val)


@pytest.mark.parametrize("kind", LOADERS)
def test_train_epoch_device_tensors_and_resume(tiny_data, kind):
    cfg = config(tiny_data, kind)
    train, val, classes = build(cfg)
    assert train.num_samples == 64 and train.steps_per_epoch == 64 // 8
    train.set_epoch(0)
    assert len(train) == train.steps_per_epoch
    full = list(train)
    assert len(full) == train.steps_per_epoch
    for images, labels in full:
        assert images.device == CPU and labels.device == CPU
        assert images.dtype == torch.float32 and images.shape == (8, 3, 32, 32)
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (8,)
        assert 0 <= labels.min() and labels.max() < len(classes)
    for k in (1, 3):  # resume after k global batches: the tail of the same epoch
        train.set_epoch(0, start_sample=k * 8)
        assert len(train) == train.steps_per_epoch - k
        tail = list(train)
        assert len(tail) == train.steps_per_epoch - k
        assert [y.tolist() for _, y in tail] == [y.tolist() for _, y in full[k:]]
    assert train.skipped == 0
    close(train, val)


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_val_counts_sum_to_num_samples(tiny_data, kind, world):
    cfg = config(tiny_data, kind, val_batch_size=6)
    seen, sizes = 0, set()
    for rank in range(world):
        train, val, _ = build(cfg, rank, world, channels_last=False)
        batches = list(val)
        assert len(batches) == len(val)
        for images, labels in batches:
            assert images.device == CPU and images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
            assert images.shape[0] == labels.shape[0] <= 6 and labels.dtype == torch.int64
        seen += sum(len(y) for _, y in batches)
        sizes.add(val.num_samples)
        close(train, val)
    assert sizes == {val.num_samples} and seen == val.num_samples
    if kind != "synthetic":  # synthetic evaluates one timed batch per rank, not the split
        assert val.num_samples == 40


@pytest.mark.parametrize("kind", LOADERS)
def test_skipped_counts_a_corrupt_file(corrupt, kind):
    train, val, _ = build(config(corrupt, kind, batch_size=4))
    train.set_epoch(0)
    assert len(list(train)) == train.steps_per_epoch == 16 // 4  # every sample read once
    assert sum(len(y) for _, y in val) == val.num_samples
    want = 0 if kind == "synthetic" else 1  # replaced by the next readable file, and counted
    assert (train.skipped, val.skipped) == (want, want)
    close(train, val)


@pytest.mark.parametrize("kind", ["torch", LOADERS[1]])
@pytest.mark.parametrize("world", [1, 2])
def test_val_only_loader_reads_no_train_file_and_gives_the_same_batches(tiny_data, tmp_path, kind, world):
    """train.evaluate's builder: the val batches of build_loaders, bit for bit, with the train
    split's files gone (so it never scans or preflights them)."""
    import shutil

    cfg = config(tiny_data, kind)
    only_val = tmp_path / "only_val"
    shutil.copytree(tiny_data / "val", only_val / "val")
    for rank in range(world):
        train, val, classes = build(cfg, rank, world)
        alone, alone_classes = build_val_loader(config(only_val, kind), DistInfo(rank, world, 0, CPU), seed=0,
                                                channels_last=True)
        assert isinstance(alone, ValLoader) and alone_classes == classes and alone.num_samples == val.num_samples
        got, want = list(alone), list(val)
        assert len(got) == len(want) > 0
        for (x, y), (wx, wy) in zip(got, want):
            assert torch.equal(x, wx) and torch.equal(y, wy)
        close(train, val, alone)
