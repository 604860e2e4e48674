"""DALI loader (CPU backend): exact epoch lengths, the torch loader's global order on any world
size, mid-epoch resume, exact validation shares, RGB decoding of CMYK/PNG, unusable files."""

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from data import torch_loader
from data.sampler import steps_per_epoch
from tests.test_preflight import TRAIN_COUNTS, VAL_COUNTS, messy_folder
from train.config import DataConfig

pytestmark = pytest.mark.dali
pytest.importorskip("nvidia.dali")
from data import dali  # noqa: E402

CPU = torch.device("cpu")
N_TRAIN = sum(TRAIN_COUNTS) + 5  # + CMYK, PNG, zero-byte, truncated, non-image
N_VAL = sum(VAL_COUNTS) + 2


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    return root, messy_folder(root)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # preflight cache out of ~/.cache


def config(root, **kw):
    return replace(DataConfig(root=str(root), loader="dali", dali_device="cpu", batch_size=4, workers=2,
                              train_crop=24, val_resize=32, val_crop=32), **kw)


def epoch(loader, ep, start=0):
    loader.set_epoch(ep, start)
    return [(x, y, i.tolist()) for x, y, i in loader.iter_indexed()]


def torch_order(cfg, rank, world, ep, start=0):
    """The sample indices the torch loader's sampler gives this rank, batch by batch."""
    sampler = torch_loader.build(replace(cfg, workers=0), rank, world, CPU, 0, False)[0].sampler
    sampler.set_epoch(ep, start)
    keys = [i for i, _ in sampler]
    return [keys[b:b + cfg.batch_size] for b in range(0, len(keys), cfg.batch_size)]


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_epoch_shapes_labels_and_skips(messy, channels_last, caplog):
    root, special = messy
    cfg = config(root)
    with caplog.at_level(logging.WARNING, logger="resnet"):
        train, val, classes = dali.build(cfg, 0, 1, CPU, 0, channels_last)
    assert "3 unusable images" in caplog.text
    samples, torch_classes = torch_loader.scan(root / "train")
    assert classes == torch_classes and train.num_samples == N_TRAIN and val.num_samples == N_VAL
    steps = steps_per_epoch(N_TRAIN, 4, 1)
    assert train.steps_per_epoch == len(train) == steps
    batches = epoch(train, 0)
    assert len(batches) == steps
    unusable = {s for k in ("zero_byte", "truncated", "non_image") for s in special[k]}
    read = [i for _, _, idx in batches for i in idx]
    for x, y, idx in batches:
        assert x.shape == (4, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert -3 < x.min() and x.max() < 3  # normalised
        for label, i in zip(y.tolist(), idx):
            path, want = samples[i]
            if path in unusable:  # replaced by the next readable file, as the torch loader does
                path, want = samples[train.subst[i]]
                assert path not in unusable
            assert label == want
    assert train.skipped == sum(samples[i][0] in unusable for i in read) > 0


@pytest.mark.parametrize("world,batch", [(1, 4), (2, 2), (3, 2)])
def test_global_order_matches_torch_loader(messy, world, batch):
    root, _ = messy
    cfg = config(root, batch_size=batch)
    loaders = [dali.build(cfg, r, world, CPU, 0, False)[0] for r in range(world)]
    for ep in (0, 1):  # epoch 1 runs on the pipeline of epoch 0, without a rebuild
        pipelines = [ld._iter for ld in loaders]
        got = [[idx for _, _, idx in epoch(ld, ep)] for ld in loaders]
        for r in range(world):
            assert got[r] == torch_order(cfg, r, world, ep)
            assert len(got[r]) == steps_per_epoch(N_TRAIN, batch, world)
        if ep:
            assert [ld._iter for ld in loaders] == pipelines
    one = [idx for _, _, idx in epoch(dali.build(config(root, batch_size=batch * world), 0, 1, CPU, 0, False)[0], 1)]
    assert one == [sum((got[r][g] for r in range(world)), []) for g in range(len(one))]


def test_resume_mid_epoch_reads_the_tail(messy):
    root, _ = messy
    cfg = config(root, batch_size=2)
    full = [[idx for _, _, idx in epoch(dali.build(cfg, r, 2, CPU, 0, False)[0], 1)] for r in range(2)]
    for start in (4, 8):  # global samples already consumed: 1 and 2 global batches
        fresh = [dali.build(cfg, r, 2, CPU, 0, False)[0] for r in range(2)]
        tails = [[idx for _, _, idx in epoch(ld, 1, start)] for ld in fresh]
        assert [len(t) for t in tails] == [len(fresh[0])] * 2 == [len(full[0]) - start // 4] * 2
        assert tails == [f[start // 4:] for f in full]
    # an epoch abandoned half way and restarted reads from its beginning again
    train = dali.build(cfg, 0, 2, CPU, 0, False)[0]
    train.set_epoch(1)
    next(iter(train))
    assert [idx for _, _, idx in epoch(train, 1)] == full[0]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 3, 4, 5])
def test_val_covers_every_image_once(messy, world, batch):
    root, _ = messy
    cfg = config(root, batch_size=2, val_batch_size=batch)
    seen = []
    for r in range(world):
        val = dali.build(cfg, r, world, CPU, 0, False)[1]
        assert val.num_samples == N_VAL
        for _ in range(2):  # a second evaluation reuses the pipeline and sees the same share
            batches = list(val.iter_indexed())
            assert len(batches) == len(val) == -(-len(val.share) // batch)
            assert all(x.shape[0] == len(i) <= batch for x, _, i in batches)
        seen += [i for _, _, idx in batches for i in idx.tolist()]
    assert sorted(seen) == list(range(N_VAL))


def test_cmyk_and_png_named_jpeg_decode_like_pil(messy):
    root, special = messy
    cfg = config(root, val_batch_size=1)
    val = dali.build(cfg, 0, 1, CPU, 0, False)[1]
    std, mean = (torch.tensor(v).view(3, 1, 1) * 255 for v in (cfg.std, cfg.mean))
    images = {val.samples[i][0]: (x[0] * std + mean) for x, _, (i,) in val.iter_indexed()}
    for path in special["cmyk"][1:] + special["png_as_jpeg"][1:]:  # the val copies
        want = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
        diff = (images[path] - want).abs()
        assert diff.mean() < 2 and diff.max() < 16, (path, diff.mean(), diff.max())


def test_replacements_wrap_around():
    samples = [(f"{i}", 0) for i in range(5)]
    assert dali.replacements(samples, {"1", "2", "4"}).tolist() == [0, 3, 3, 3, 0]


def test_gpu_graph_is_valid_without_a_gpu():
    """DALI checks operator arguments when the graph is defined, so the mixed-decoder options
    (hardware decoder load, nvJPEG preallocation) are checked here even without CUDA."""
    cfg = DataConfig()
    for train in (True, False):
        feed = dali.Feed([("x", 0)], np.zeros(1, dtype=np.int64), iter(()), 1)
        dali.make_pipeline(feed, train, cfg, gpu=True, hwc=True, batch_size=2, num_threads=1, device_id=0)
        feed.close()
    if not torch.cuda.is_available():
        with pytest.raises(dali.ConfigError, match="dali_device"):
            dali.use_gpu("gpu", CPU)
    assert not dali.use_gpu("auto", CPU) and not dali.use_gpu("cpu", CPU)
