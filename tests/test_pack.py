"""Packed datasets (data/pack.py, data/packed.py): standard WebDataset tars with an index, left-out
unusable files, an interrupted pack that never looks complete, flat ImageNet val, re-encoding, and
the bar: a packed and a folder copy give the torch and DALI loaders identical batches, and the
trainer identical weights."""

import importlib.util
import json
import shutil
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import build_loaders, folder, pack, packed
from tests.conftest import make_image_folder, run_trainer, write_config
from train import config as config_lib
from train.config import DataConfig
from train.distributed import DistInfo
from train.export import model_state_dict

CPU = torch.device("cpu")
HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
needs_dali = [pytest.mark.dali, pytest.mark.skipif(not HAS_DALI, reason="no DALI")]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # DALI's preflight cache out of ~/.cache


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(folder, packed copy of it in several small shards)."""
    base = tmp_path_factory.mktemp("both")
    src = make_image_folder(base / "folder", classes=4, train_per_class=16, val=40, size=32)
    pack.pack(src, base / "packed", shard_size=20_000, workers=2)
    return src, base / "packed"


def config(root, loader="torch", **kw):
    return DataConfig(**{**dict(root=str(root), loader=loader, dali_device="cpu", batch_size=8, workers=0,
                                train_crop=32, val_resize=32, val_crop=32, min_scale=0.5), **kw})


def test_shards_are_webdataset_tars_and_the_index_points_into_them(both):
    src, out = both
    meta = json.loads((out / "index.json").read_text())
    train = meta["splits"]["train"]
    assert meta["classes"] == [f"n{c:08d}" for c in range(4)] and train["samples"] == 64
    assert len(train["shards"]) > 2 and sum(s["samples"] for s in train["shards"]) == 64
    listing = subprocess.run(["tar", "tf", str(out / train["shards"][0]["file"])], capture_output=True,
                             text=True, check=True).stdout.split()
    assert listing[:2] == ["n00000000/00000.jpg", "n00000000/00000.cls"]  # key.jpg + key.cls per sample
    index = np.load(out / "train.index.npy")
    split = folder.scan(src / "train")
    for shard_no, shard in enumerate(train["shards"]):
        with tarfile.open(out / shard["file"]) as tar:  # the tar's own view of the members
            members = tar.getmembers()
            rows = index[index[:, packed.SHARD] == shard_no]
            images = [m for m in members if m.name.endswith(".jpg")]
            assert [m.offset_data for m in images] == rows[:, packed.OFFSET].tolist()
            assert [m.size for m in images] == rows[:, packed.SIZE].tolist()
            labels = [int(tar.extractfile(m).read()) for m in members if m.name.endswith(".cls")]
            assert labels == rows[:, packed.LABEL].tolist()
    for i, (path, label) in enumerate(split.samples):
        shard, offset, size, lab = index[i]
        with open(out / train["shards"][shard]["file"], "rb") as f:
            f.seek(offset)
            assert f.read(size) == Path(path).read_bytes() and lab == label
    wids = json.loads((out / "train.wids.json").read_text())
    assert wids["__kind__"] == "wids-shard-index-v1"
    assert [s["nsamples"] for s in wids["shardlist"]] == [s["samples"] for s in train["shards"]]
    for name, f in meta["files"].items():
        assert (out / name).stat().st_size == f["size"] and pack.sha256(out / name) == f["sha256"]


def test_packed_split_reads_what_the_folder_holds(both):
    src, out = both
    for name in ("train", "val"):
        a, b = folder.scan(src / name), folder.scan(out / name)
        assert isinstance(b, packed.PackedSplit) and len(a) == len(b) and a.classes == b.classes
        for i in range(len(a)):
            x = b.read_bytes(i)
            assert x.flags.writeable and np.array_equal(x, a.read_bytes(i)) and a.label(i) == b.label(i)
        assert b.name(3).endswith(str(Path(a.name(3)).relative_to(src / name)))
    sub_a, sub_b = folder.scan(src / "train", ["n00000003", "n00000001"]), folder.scan(out / "train", ["n00000003",
                                                                                                       "n00000001"])
    assert sub_b.classes == sub_a.classes and len(sub_b) == len(sub_a) == 32
    assert [sub_b.label(i) for i in range(32)] == [sub_a.label(i) for i in range(32)]
    assert all(np.array_equal(sub_a.read_bytes(i), sub_b.read_bytes(i)) for i in range(32))


def test_repacking_is_a_no_op_and_an_interrupted_pack_never_looks_complete(tmp_path, monkeypatch, capsys):
    src = make_image_folder(tmp_path / "src", classes=2, train_per_class=4, val=4, size=16)
    out = tmp_path / "out"
    real = pack.pack_split

    def crash_on_val(split, *args, **kw):
        if split == "val":
            raise KeyboardInterrupt  # killed half way
        return real(split, *args, **kw)

    monkeypatch.setattr(pack, "pack_split", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        pack.pack(src, out, workers=2)
    assert not out.exists() and not folder.is_packed(out) and (tmp_path / "out.partial").is_dir()
    monkeypatch.setattr(pack, "pack_split", real)
    assert pack.main([str(src), str(out), "--workers", "2"]) == 0
    assert folder.is_packed(out) and not (tmp_path / "out.partial").exists()
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert pack.main([str(src), str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert pack.main([str(src), str(out), "--shard-size", "1MiB"]) == 2  # other options: refused, not mixed
    (src / "train" / "n00000000" / "00000.JPEG").unlink()  # other input: refused too
    assert pack.main([str(src), str(out)]) == 2


def test_unusable_files_are_left_out_and_reported(tmp_path):
    src = make_image_folder(tmp_path / "src", classes=2, train_per_class=8, val=8, size=16)
    bad = src / "train" / "n00000001" / "00003.JPEG"
    bad.write_bytes(b"not a JPEG\n" * 30)
    empty = src / "val" / "n00000000" / "00004.JPEG"
    empty.write_bytes(b"")
    meta = pack.pack(src, tmp_path / "out", workers=2)
    assert meta["splits"]["train"]["samples"] == 15 and meta["splits"]["train"]["left_out"] == 1
    assert meta["splits"]["train"]["preflight"]["non_image"] == 1
    assert meta["splits"]["val"]["samples"] == 7 and meta["splits"]["val"]["preflight"]["zero_byte"] == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["train"]["non_image"] == [str(bad)] and report["val"]["zero_byte"] == [str(empty)]
    names = (tmp_path / "out" / "train.names.txt").read_text().split()
    assert "n00000001/00003.JPEG" not in names and len(names) == 15


def test_flat_imagenet_val_with_loc_csv_packs_like_its_class_folders(tmp_path):
    """Kaggle's layout: train/<wnid>/..., a flat val/ and LOC_val_solution.csv beside them."""
    src = make_image_folder(tmp_path / "kaggle", classes=3, train_per_class=4, val=9, size=16)
    sorted_copy = shutil.copytree(src, tmp_path / "sorted")
    rows = ["ImageId,PredictionString"]
    for p in sorted((src / "val").glob("*/*.JPEG")):
        name = f"ILSVRC2012_val_{int(p.stem) + 1:08d}"
        p.rename(src / "val" / f"{name}.JPEG")
        (sorted_copy / "val" / p.parent.name / p.name).rename(sorted_copy / "val" / p.parent.name / f"{name}.JPEG")
        rows.append(f"{name},{p.parent.name} 1 2 3 4 {p.parent.name} 5 6 7 8")
    for d in (src / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    (src / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    pack.pack(src, tmp_path / "flat", workers=2)
    pack.pack(sorted_copy, tmp_path / "folders", workers=2)
    a, b = folder.scan(tmp_path / "flat" / "val"), folder.scan(tmp_path / "folders" / "val")
    assert len(a) == len(b) == 9
    assert all(a.label(i) == b.label(i) and np.array_equal(a.read_bytes(i), b.read_bytes(i)) for i in range(9))
    (src / "LOC_val_solution.csv").unlink()
    with pytest.raises(pack.DataError, match="LOC_val_solution.csv"):
        pack.pack(src, tmp_path / "nolabels", workers=2)


def test_max_side_reencodes_large_images_and_is_recorded(tmp_path):
    src = make_image_folder(tmp_path / "src", classes=2, train_per_class=2, val=2, size=64)
    small = src / "train" / "n00000000" / "00000.JPEG"
    Image.open(small).resize((20, 10)).save(small, quality=90)
    meta = pack.pack(src, tmp_path / "out", max_side=32, quality=80, workers=2)
    assert meta["encoding"] == {"max_side": 32, "quality": 80} and meta["splits"]["train"]["reencoded"] == 3
    split = folder.scan(tmp_path / "out" / "train")
    sizes = [Image.open(__import__("io").BytesIO(split.read_bytes(i).tobytes())).size for i in range(len(split))]
    assert sizes[0] == (20, 10) and sizes[1:] == [(32, 32)] * 3
    assert np.array_equal(split.read_bytes(0), np.fromfile(small, dtype=np.uint8))  # small ones untouched


def batches(cfg, epoch=1, start=0, world=1, rank=0):
    train, val, classes = build_loaders(cfg, DistInfo(rank, world, 0, CPU), seed=0, channels_last=False)
    train.set_epoch(epoch, start)
    out = [(x.clone(), y.clone()) for x, y in train], [(x.clone(), y.clone()) for x, y in val], classes
    for loader in (train, val):
        if hasattr(loader, "close"):
            loader.close()
    return out


@pytest.mark.parametrize("kind,workers", [("torch", 0), ("torch", 2), pytest.param("dali", 2, marks=needs_dali)])
def test_packed_and_folder_give_identical_batches(both, kind, workers):
    """Same images bit for bit, same labels, same order: a whole epoch, a resumed one, and validation."""
    src, out = both
    for start, world, rank in ((0, 1, 0), (24, 2, 1)):  # and mid-epoch on rank 1 of 2
        cfg = config(src, kind, workers=workers)
        a_train, a_val, a_classes = batches(cfg, start=start, world=world, rank=rank)
        b_train, b_val, b_classes = batches(replace(cfg, root=str(out)), start=start, world=world, rank=rank)
        assert a_classes == b_classes and len(a_train) == len(b_train) > 0 and len(a_val) == len(b_val) > 0
        for (xa, ya), (xb, yb) in zip(a_train + a_val, b_train + b_val):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_sample_damaged_in_its_shard_is_replaced_and_counted(both, tmp_path):
    _, out = both
    damaged = shutil.copytree(out, tmp_path / "damaged")
    index = np.load(damaged / "train.index.npy")
    shard, offset, size, _ = index[5]
    with open(damaged / f"train-{shard:06d}.tar", "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * size)
    train, _, _ = build_loaders(config(damaged), DistInfo(0, 1, 0, CPU), seed=0, channels_last=False)
    train.set_epoch(0)
    assert len(list(train)) == train.steps_per_epoch and train.skipped == 1


@pytest.mark.dali
@pytest.mark.skipif(not HAS_DALI, reason="no DALI")
def test_dali_webdataset_reader_reads_the_shards(both):
    """The shards are plain WebDataset: DALI's own reader yields our samples and labels."""
    from nvidia.dali import fn, pipeline_def

    _, out = both
    meta = json.loads((out / "index.json").read_text())
    shards = [str(out / s["file"]) for s in meta["splits"]["val"]["shards"]]

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def pipe():
        images, labels = fn.readers.webdataset(paths=shards, ext=["jpg", "cls"], missing_component_behavior="error")
        return images, labels

    p = pipe()
    p.build()
    split = folder.scan(out / "val")
    got = []
    for _ in range(5):
        images, labels = p.run()
        got += [(np.array(images[j]), int(bytes(np.array(labels[j])))) for j in range(8)]
    for i, (data, label) in enumerate(got):
        assert np.array_equal(data, split.read_bytes(i)) and label == split.label(i)


def test_config_and_synthetic_loader_accept_a_packed_root(both):
    _, out = both
    cfg = config_lib.load(None, [f"data.root={out}"])
    assert cfg.data.root == str(out)
    _, _, classes = build_loaders(config(out, "synthetic"), DistInfo(0, 1, 0, CPU), seed=0, channels_last=False)
    assert classes == [f"n{c:08d}" for c in range(4)]


def test_training_from_packed_equals_training_from_the_folder(both, tmp_path):
    src, out = both
    cfg = write_config(tmp_path, src)
    common = ["train.max_steps=4", "train.epochs=1", "log.tensorboard=false", "checkpoint.every_epochs=1"]
    run_trainer(cfg, *common, "log.name=folder")
    run_trainer(cfg, *common, f"data.root={out}", "log.name=packed")
    a, b = model_state_dict(tmp_path / "runs/folder"), model_state_dict(tmp_path / "runs/packed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
