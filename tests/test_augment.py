"""Augmentations chosen in config (data/augment.py): the same distribution on the torch and the
DALI loaders for pad-crop offsets, random-erasing boxes and how far TrivialAugment/RandAugment move
an image, which are also seeded per sample on the torch path, resume stays exact with all of them and
repeated augmentation on, and the DALI loader reads the repeated-augmentation order too."""

from __future__ import annotations

import collections
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from data import augment, folder, torch_loader
from data.sampler import sample_seed
from train.config import ConfigError, DataConfig, load
from train.distributed import DistInfo

CPU = torch.device("cpu")
ONE = DistInfo(0, 1, 0, CPU)
STEP, BASE = 7, 10  # marker image: pixel (y, x) is (BASE + STEP x, BASE + STEP y, 255)


def marker_folder(root: Path, size: int, copies: int) -> Path:
    """`copies` identical lossless PNGs (named .png) whose colour encodes the pixel position."""
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([BASE + STEP * x, BASE + STEP * y, np.full_like(x, 255)], -1).astype(np.uint8)
    for split, n in (("train", copies), ("val", 4)):
        (root / split / "n00000000").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(pixels).save(root / split / "n00000000" / f"{i:05d}.png")
    return root


def config(root, **kw) -> DataConfig:
    base = DataConfig(root=str(root), batch_size=16, workers=0, train_crop=32, val_resize=32, val_crop=32,
                      crop="pad", pad=4, hflip=False)
    return replace(base, **kw)


def pixels(images: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Normalised float images back to 0..255 (rounded)."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255
    return (images.cpu() * std + mean).round()


def loader_images(cfg: DataConfig, loader: str, epochs: int) -> torch.Tensor:
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
        from data import dali

        train = dali.build(replace(cfg, loader="dali", dali_device="cpu", workers=2), ONE, seed=0,
                           channels_last=False)[0]
    else:
        train = torch_loader.build(cfg, ONE, seed=0, channels_last=False)[0]
    out = []
    for e in range(epochs):
        train.set_epoch(e)
        out += [x for x, _ in train]
    return torch.cat(out)


@pytest.fixture(scope="module")
def markers(tmp_path_factory) -> Path:
    return marker_folder(tmp_path_factory.mktemp("markers"), 32, 64)


@pytest.fixture(scope="module")
def markers_64(tmp_path_factory) -> Path:
    return marker_folder(tmp_path_factory.mktemp("markers64"), 64, 64)


# --- (a) the same distribution on both loaders -----------------------------------------------------

@pytest.mark.dali
def test_pad_crop_offsets_uniform_over_the_same_range(markers):
    cfg = config(markers)
    pad = cfg.pad
    offsets = {}
    for loader in ("torch", "dali"):
        px = pixels(loader_images(cfg, loader, epochs=32), cfg)  # 2048 crops of the same image
        centre = px[:, :, 16, 16]  # always inside the image: |offset| <= pad < 16
        assert (centre[:, 2] == 255).all()
        dx = ((centre[:, 0] - BASE) / STEP).round().long() - 16
        dy = ((centre[:, 1] - BASE) / STEP).round().long() - 16
        assert torch.equal(centre[:, 0], (BASE + STEP * (dx + 16)).float())  # decoded exactly
        offsets[loader] = (dy, dx)
        n = len(dx)
        for axis in (dy, dx):
            counts = collections.Counter(axis.tolist())
            assert set(counts) == set(range(-pad, pad + 1))
            expected = n / (2 * pad + 1)
            assert all(0.7 * expected < c < 1.3 * expected for c in counts.values()), counts  # > 4 sd apart
        # the two axes are drawn independently: all 81 (dy, dx) pairs occur
        assert len(set(zip(dy.tolist(), dx.tolist()))) == (2 * pad + 1) ** 2
        # and outside the image the crop is zero padding
        tl = px[(dy < 0) & (dx < 0)][:, :, 0, 0]
        assert (tl == 0).all()


def erased_boxes(images: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """(top, left, h, w) of the region that is exactly 0 in all channels, None if there is none."""
    out = []
    for img in images:
        zero = (img == 0).all(0)
        if not zero.any():
            out.append(None)
            continue
        ys, xs = torch.nonzero(zero, as_tuple=True)
        top, left, h, w = ys.min().item(), xs.min().item(), ys.max().item() - ys.min().item() + 1, \
            xs.max().item() - xs.min().item() + 1
        assert zero.sum() == h * w and zero[top:top + h, left:left + w].all()  # one rectangle
        out.append((top, left, h, w))
    return out


@pytest.mark.dali
def test_random_erasing_boxes_have_the_same_distribution(markers_64):
    size = 64
    cfg = config(markers_64, train_crop=size, val_resize=size, val_crop=size, pad=0, random_erasing=0.75)
    stats = {}
    for loader in ("torch", "dali"):
        boxes = erased_boxes(loader_images(cfg, loader, epochs=24))  # 1536 images
        hit = [b for b in boxes if b is not None]
        frac = np.array([h * w / size**2 for _, _, h, w in hit])
        ratio = np.array([h / w for _, _, h, w in hit])
        assert all(t >= 0 and lf >= 0 and t + h <= size and lf + w <= size for t, lf, h, w in hit)
        stats[loader] = dict(p=len(hit) / len(boxes), frac=frac, ratio=ratio,
                             top=np.array([t / (size - h) for t, _, h, _ in hit if h < size]))
    for loader, s in stats.items():
        assert 0.71 < s["p"] < 0.79, (loader, s["p"])  # p = 0.75, 1536 draws: sd 0.011
        # area fraction in [0.02, 0.33] up to rounding h and w to whole pixels, aspect in [0.3, 3.3]
        assert 0.015 < s["frac"].min() and s["frac"].max() < 0.36, loader
        assert 0.25 < s["ratio"].min() and s["ratio"].max() < 3.9, loader
        assert 0.4 < s["top"].mean() < 0.6  # corner uniform where the box fits
    t, d = stats["torch"], stats["dali"]
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # the same distribution: quantiles agree
        assert abs(np.quantile(t["frac"], q) - np.quantile(d["frac"], q)) < 0.03, q
        assert abs(np.log(np.quantile(t["ratio"], q) / np.quantile(d["ratio"], q))) < 0.2, q


def test_erasing_box_is_torchvisions_random_erasing():
    """The torch path's box comes from v2.RandomErasing's own draws: with the same generator
    state, erasing the normalised image by the box equals v2.RandomErasing on it."""
    ref, ours = v2.RandomErasing(p=0.5), augment.ErasingBox(p=0.5)
    image = torch.randn(20, 3, 48, 40)
    for n in range(20):
        torch.manual_seed(n)
        want = ref(image[n])
        torch.manual_seed(n)
        box = ours.box(image[n])
        for masked in (False, True):  # the CPU's slices and the accelerators' masked fill
            got = augment.erase_(image[n:n + 1].clone(), box[None], masked=masked)[0]
            assert torch.equal(got, want)
    assert sum(bool(ours.box(image[0])[2]) for _ in range(200)) in range(70, 131)


# --- (b) TrivialAugment / RandAugment ---------------------------------------------------------------

@pytest.mark.parametrize("policy", ["trivial_augment", "rand_augment"])
def test_auto_augment_changes_images_and_is_seeded_per_sample_on_torch(markers, policy):
    cfg = config(markers, pad=0, auto_augment=policy)
    split = folder.scan(markers / "train")
    none = replace(cfg, auto_augment="none")
    plain = torch_loader.ImageFolderDataset(split, lambda s: torch_loader.train_transform(none, s))
    aug = torch_loader.ImageFolderDataset(split, lambda s: torch_loader.train_transform(cfg, s))
    keys = [(i, sample_seed(0, 0, i), 32) for i in range(64)]
    base = plain[keys[0]][0]
    outs = [aug[k][0] for k in keys]
    changed = sum(not torch.equal(o, base) for o in outs)
    assert changed >= 0.8 * len(outs), changed  # TrivialAugment: identity is 1 of 14 ops
    assert all(torch.equal(aug[k][0], o) for k, o in zip(keys[:8], outs))  # same seed, same image
    again = torch_loader.ImageFolderDataset(split, lambda s: torch_loader.train_transform(cfg, s))
    assert all(torch.equal(again[k][0], o) for k, o in zip(keys[8:16], outs[8:16]))  # any dataset object
    assert len({o.numpy().tobytes() for o in outs}) > 0.5 * len(outs)  # seeds differ, images differ


@pytest.mark.dali
@pytest.mark.parametrize("policy", ["trivial_augment", "rand_augment"])
def test_auto_augment_changes_images_on_dali(markers, policy):
    cfg = config(markers, pad=0)
    base = loader_images(cfg, "dali", epochs=1)[0]
    outs = loader_images(replace(cfg, auto_augment=policy), "dali", epochs=1)
    changed = sum(not torch.equal(o, base) for o in outs)
    assert changed >= 0.8 * len(outs), changed
    assert len({o.numpy().tobytes() for o in outs}) > 0.5 * len(outs)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the two empirical CDFs (no scipy here)."""
    a, b, v = np.sort(a), np.sort(b), np.concatenate([a, b])
    cdf_a, cdf_b = np.searchsorted(a, v, side="right") / len(a), np.searchsorted(b, v, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.dali
@pytest.mark.parametrize("policy, unchanged", [("trivial_augment", (0.08, 0.22)), ("rand_augment", (0.0, 0.05))])
def test_auto_augment_has_the_same_distribution_on_both_loaders(markers, policy, unchanged):
    """How far the policy moves each of 256 draws from the plain image (mean |change| per pixel):
    torch's and DALI's samples pass a two-sample KS test at the 0.1 % level (D < 1.95 sqrt(2/256)
    = 0.172; measured 0.086 for TrivialAugment, 0.156 for RandAugment), and both leave about as
    many images untouched (TrivialAugment: identity, or a no-op at magnitude 0; measured 14.5 vs
    14.1 %)."""
    cfg = config(markers, pad=0)
    base = pixels(loader_images(cfg, "torch", epochs=1)[:1], cfg)
    change = {}
    for loader in ("torch", "dali"):
        images = pixels(loader_images(replace(cfg, auto_augment=policy), loader, epochs=4), cfg)
        change[loader] = (images - base).abs().mean((1, 2, 3)).numpy()
        assert len(change[loader]) == 256
        assert unchanged[0] <= (change[loader] == 0).mean() <= unchanged[1], loader
    assert ks_statistic(change["torch"], change["dali"]) < 1.95 * (2 / 256) ** 0.5


# --- (c) resume exactness with everything on --------------------------------------------------------

@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    from tests.conftest import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("many"), classes=4, train_per_class=72, val=8, size=24)


def test_resume_is_exact_with_augmentations_and_repeated_aug(many):
    cfg = replace(config(many, batch_size=8, train_crop=24, val_resize=24, val_crop=24, hflip=True),
                  auto_augment="trivial_augment", random_erasing=0.5, repeated_aug=2)
    train = torch_loader.build(cfg, ONE, seed=3, channels_last=False)[0]
    assert train.steps_per_epoch == 288 // 256 * 256 // 8  # RASampler's epoch length
    train.set_epoch(1)
    full = list(train)
    assert any((x == 0).all(1).any() for x, _ in full)  # some images were erased
    for k in (3, 17):  # global samples consumed = k batches
        tail_loader = torch_loader.build(replace(cfg, workers=2), ONE, seed=3, channels_last=False)[0]
        tail_loader.set_epoch(1, start_sample=k * 8)
        tail = list(tail_loader)
        assert len(tail) == len(full) - k
        for (x, y), (fx, fy) in zip(tail, full[k:]):
            assert torch.equal(x, fx) and torch.equal(y, fy)
    # two ranks of batch 4 resumed at 24 read the same global batches as one rank of batch 8
    two = [torch_loader.build(replace(cfg, batch_size=4), DistInfo(r, 2, 0, CPU), seed=3, channels_last=False)[0]
           for r in range(2)]
    for t in two:
        t.set_epoch(1, start_sample=24)
    for (a, _), (b, _), (fx, _) in zip(*two, full[3:]):
        got = sorted(img.numpy().tobytes() for img in torch.cat([a, b]))
        assert got == sorted(img.numpy().tobytes() for img in fx)


@pytest.mark.dali
def test_dali_reads_the_repeated_aug_order(many):
    pytest.importorskip("nvidia.dali")
    from data import dali

    cfg = replace(config(many, batch_size=4, train_crop=24, val_resize=24, val_crop=24), repeated_aug=3,
                  loader="dali", dali_device="cpu", workers=2)
    for world in (1, 2):
        for r in range(world):
            ld = dali.build(cfg, DistInfo(r, world, 0, CPU), seed=0, channels_last=False)[0]
            sampler = torch_loader.build(replace(cfg, workers=0), DistInfo(r, world, 0, CPU), seed=0,
                                         channels_last=False)[0].sampler
            assert ld.steps_per_epoch == sampler.steps_per_epoch == 256 // world // 4
            ld.set_epoch(1, start_sample=8 * world)
            sampler.set_epoch(1, start_sample=8 * world)
            got = [i for _, _, idx in ld.iter_indexed() for i in idx.tolist()]
            assert got == [i for i, _ in sampler]


def test_config_keys_and_validation():
    cfg = load(None, ["data.auto_augment=rand_augment", "data.rand_augment_n=3", "data.rand_augment_m=15",
                      "data.random_erasing=0.25", "data.repeated_aug=4"], check_data=False)
    d = cfg.data
    assert (d.auto_augment, d.rand_augment_n, d.rand_augment_m, d.random_erasing, d.repeated_aug) == \
        ("rand_augment", 3, 15, 0.25, 4)
    assert (DataConfig().rand_augment_n, DataConfig().rand_augment_m) == (2, 9)  # torchvision's defaults
    for bad, msg in (("data.auto_augment=autoaugment", "data.auto_augment: 'autoaugment' is not one of"),
                     ("data.random_erasing=1.5", "data.random_erasing: must be a probability"),
                     ("data.rand_augment_m=31", "data.rand_augment_m: must be a magnitude bin in 0..30"),
                     ("data.repeated_aug=0", "data.repeated_aug: must be > 0")):
        with pytest.raises(ConfigError, match=msg):
            load(None, [bad], check_data=False)
