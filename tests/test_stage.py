"""Staging to node-local disk (data/stage.py): one copy per node under concurrent ranks, a copy cut
short or damaged is never used and is redone, checksums are checked, folders stage as trees."""

import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data import DataError, build_loaders, folder, pack, stage
from tests.conftest import make_image_folder
from train.config import DataConfig
from train.distributed import DistInfo

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def packed_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("stage")
    src = make_image_folder(base / "folder", classes=2, train_per_class=64, val=16, size=64)
    pack.pack(src, base / "packed", shard_size=64 * 1024, workers=2)
    return base / "packed"


def copies(stage_dir: Path) -> list[Path]:
    return sorted(p for p in stage_dir.iterdir() if not p.name.startswith("."))


def _rank(root, stage_dir, rank, barrier, results):
    barrier.wait()  # all ranks ask at once
    s = stage.stage(root, stage_dir, rank=rank)
    results.put((rank, str(s.path), s.copied, s.waited))


def test_concurrent_ranks_make_one_copy(packed_data, tmp_path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(packed_data, tmp_path / "local", r, barrier, results)) for r in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({path for _, path, _, _ in got}) == 1
    assert sum(copied for _, _, copied, _ in got) == 1  # one copy; the other ranks waited or reused it
    (dest,) = copies(tmp_path / "local")
    marker = json.loads((dest / stage.MARKER).read_text())
    assert marker["rank"] in (0, 1, 2) and marker["bytes"] == stage.manifest(packed_data).bytes
    again = stage.stage(packed_data, tmp_path / "local")  # a requeued job on the same node
    assert not again.copied and again.path == dest


def _crash_mid_copy(root, stage_dir):
    """A job killed while it copies: half of one shard written, then the process dies holding the lock."""
    real = stage.copy_file
    count = []

    def copy_then_die(src, dst, size, sha):
        count.append(1)
        if len(count) == 3:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(Path(src).read_bytes()[: size // 2])
            os._exit(9)
        real(src, dst, size, sha)

    stage.copy_file = copy_then_die
    stage.stage(root, stage_dir, workers=1)


def test_a_copy_cut_short_is_never_used_and_is_redone(packed_data, tmp_path):
    local = tmp_path / "local"
    p = mp.get_context("fork").Process(target=_crash_mid_copy, args=(packed_data, local))
    p.start()
    p.join(timeout=60)
    assert p.exitcode == 9
    assert copies(local) == [] and any(n.name.endswith(".partial") for n in local.iterdir())  # only the temp dir
    s = stage.stage(packed_data, local)
    assert s.copied and copies(local) == [s.path] and not any(n.name.endswith(".partial") for n in local.iterdir())
    assert stage.is_complete(s.path, stage.manifest(packed_data))
    for name, f in json.loads((packed_data / "index.json").read_text())["files"].items():
        assert pack.sha256(s.path / name) == f["sha256"]


@pytest.mark.parametrize("damage", ["truncated shard", "no marker", "other source"])
def test_a_damaged_copy_is_redone(packed_data, tmp_path, damage):
    local = tmp_path / "local"
    first = stage.stage(packed_data, local)
    shard = sorted(first.path.glob("train-*.tar"))[1]
    if damage == "truncated shard":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "no marker":
        (first.path / stage.MARKER).unlink()
    else:
        marker = json.loads((first.path / stage.MARKER).read_text())
        (first.path / stage.MARKER).write_text(json.dumps({**marker, "digest": "0" * 64}))
    again = stage.stage(packed_data, local)
    assert again.copied and again.path == first.path and stage.is_complete(again.path, stage.manifest(packed_data))


def test_a_shard_that_does_not_match_its_checksum_is_not_staged(packed_data, tmp_path):
    bad = shutil.copytree(packed_data, tmp_path / "bad")
    shard = sorted(bad.glob("train-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0xFF  # same size, one flipped byte
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        stage.stage(bad, tmp_path / "local")
    assert copies(tmp_path / "local") == []


def test_folders_stage_as_trees_and_read_the_same(tmp_path):
    src = make_image_folder(tmp_path / "folder", classes=2, train_per_class=4, val=4, size=16)
    s = stage.stage(src, tmp_path / "local")
    assert s.copied and (s.path / "train" / "n00000001").is_dir()
    a, b = folder.scan(src / "train"), folder.scan(s.path / "train")
    assert [lab for _, lab in a.samples] == [lab for _, lab in b.samples]
    assert all(np.array_equal(a.read_bytes(i), b.read_bytes(i)) for i in range(len(a)))
    assert not stage.stage(src, tmp_path / "local").copied
    (src / "train" / "n00000000" / "00000.JPEG").write_bytes(b"changed")
    assert stage.stage(src, tmp_path / "local").path != s.path  # changed source: a new copy


def test_build_loaders_reads_the_staged_copy(packed_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NODE_SCRATCH", str(tmp_path / "scratch"))
    cfg = DataConfig(root=str(packed_data), stage_dir="$NODE_SCRATCH/job", batch_size=8, workers=0,
                     train_crop=32, val_resize=32, val_crop=32)
    train, val, classes = build_loaders(cfg, DistInfo(0, 1, 0, CPU), seed=0, channels_last=False)
    assert train.loader.dataset.split.root.parent == tmp_path / "scratch" / "job"
    assert classes == ["n00000000", "n00000001"] and train.num_samples == 128
    monkeypatch.delenv("NODE_SCRATCH")
    with pytest.raises(DataError, match="unset"):
        build_loaders(cfg, DistInfo(0, 1, 0, CPU), seed=0, channels_last=False)
