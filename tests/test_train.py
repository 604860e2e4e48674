"""End-to-end trainer bars: DDP == bigger batch, exact validation, resume == uninterrupted."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import make_image_folder, run_trainer, write_config
from tests.distributed_helpers import run_ranks
from train.export import model_state_dict


def weights(run_dir):
    return model_state_dict(run_dir)


def test_two_ranks_equal_one_rank_with_double_batch(tmp_path, tiny_data):
    cfg = write_config(tmp_path, tiny_data)
    common = ["train.max_steps=4", "train.epochs=1", "checkpoint.every_epochs=1", "model.sync_bn=true"]
    run_trainer(cfg, *common, "data.batch_size=4", "log.name=two", nproc=2)
    run_trainer(cfg, *common, "data.batch_size=8", "log.name=one", nproc=1)
    two, one = weights(tmp_path / "runs/two"), weights(tmp_path / "runs/one")
    assert two.keys() == one.keys()
    moved = 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    init = make_init(tmp_path, tiny_data)
    moved = sum(not torch.equal(one[k], init[k]) for k in one if one[k].is_floating_point())
    assert moved > 10  # the weights did train


def make_init(tmp_path, data):
    cfg = write_config(tmp_path, data)
    run_trainer(cfg, "train.max_steps=1", "optim.lr=1e-12", "log.name=init")
    return weights(tmp_path / "runs/init")


def _evaluate(rank, world, root):
    from data import torch_loader
    from train.config import DataConfig, ModelConfig
    from train.distributed import DistInfo
    from train.models import build
    from train.trainer import evaluate

    torch.manual_seed(0)
    cfg = DataConfig(root=str(root), batch_size=7, workers=0, train_crop=16, val_resize=16, val_crop=16)
    _, val, classes = torch_loader.build(cfg, DistInfo(rank, world, 0, torch.device("cpu")), seed=0,
                                         channels_last=False)
    model = build(ModelConfig(name="resnet20", stem="cifar"), len(classes))
    with torch.no_grad():  # random BN statistics so predictions are varied
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
    return evaluate(model, val, torch.nn.CrossEntropyLoss(), "off")


def test_validation_counts_every_image_once(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=5, train_per_class=5, val=1001, size=16)
    results = [run_ranks(_evaluate, w, root)[0] for w in (1, 2, 3)]
    assert [r["count"] for r in results] == [1001, 1001, 1001]
    assert results[0]["top1"] == results[1]["top1"] == results[2]["top1"]
    assert 0 < results[0]["top1"] < 100
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)


@pytest.mark.parametrize("stop", ["epoch", "mid-epoch"])
def test_resume_equals_uninterrupted(tmp_path, tiny_data, stop):
    cfg = write_config(tmp_path, tiny_data)
    run_trainer(cfg, "log.name=full", nproc=2)
    # 64 images, global batch 16: 4 steps per epoch; stop after epoch 1 or in the middle of epoch 2
    first = ["train.max_steps=4"] if stop == "epoch" else ["train.max_steps=6"]
    run_trainer(cfg, "log.name=cut", *first, nproc=2)
    r = run_trainer(cfg, "log.name=cut", nproc=2)
    assert ("resumed from" in r.stdout) and ("step 4," in r.stdout if stop == "epoch" else "step 6," in r.stdout)
    full, cut = weights(tmp_path / "runs/full"), weights(tmp_path / "runs/cut")
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    summary = json.loads((tmp_path / "runs/cut/summary.json").read_text())
    assert summary["epochs"] == 2 and summary["steps"] == 8
