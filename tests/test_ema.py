"""Weight EMA (train/optim.py): AveragedModel maths, BN buffers, and exact resume with MixUp/CutMix on."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from tests.conftest import run_trainer, write_config
from train import evaluate, export
from train.optim import EMA, torchvision_decay_per_step


def test_ema_every_k_steps_equals_decay_to_the_k_and_averages_bn_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9, every=2)
    expected = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    first = True
    for step in range(1, 7):
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight))
            model(torch.randn(8, 3))  # train mode: BN running stats move
        ema.after_step(step)
        if step % 2 == 0:
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    expected[k] = v.clone() if first else 0.81 * expected[k] + 0.19 * v
            first = False
    got = ema.module.state_dict()
    for k in expected:  # running_mean/var included: use_buffers=True as torchvision
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-6, msg=k)
    assert int(ema.averaged.n_averaged) == 3


def test_ema_is_a_copy_during_warmup():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5, warmup_steps=2)
    for step in (1, 2):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.after_step(step)
        assert torch.equal(ema.module.weight, model.weight)
    for step in (3, 4):  # after warmup: one more copy (n_averaged was 0), then the first average
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.after_step(step)
    torch.testing.assert_close(ema.module.weight, model.weight - 0.5)


def test_torchvision_decay_conversion():
    # torchvision's recipe: 8 GPUs x 128, model_ema_steps 32, decay 0.99998, 600 epochs
    per_step = torchvision_decay_per_step(0.99998, 32, world_size=8, batch_size=128, epochs=600)
    alpha = (1 - 0.99998) * 8 * 128 * 32 / 600
    assert per_step ** 32 == pytest.approx(1 - alpha, rel=1e-12)


# with TrivialAugment and random erasing in the loader too (repeated augmentation needs >= 256
# images for one RASampler epoch: its resume is tests/test_sampler.py's and test_elastic.py's)
EMA_MIX = ["optim.ema_decay=0.9", "optim.ema_every=2", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
           "data.mix_prob=0.8", "checkpoint.best_by=val_ema", "data.auto_augment=trivial_augment",
           "data.random_erasing=0.25"]


def test_resume_with_ema_and_mixing_equals_uninterrupted(tmp_path, tiny_data):
    cfg = write_config(tmp_path, tiny_data)
    f = run_trainer(cfg, "log.name=full", *EMA_MIX, nproc=2)
    run_trainer(cfg, "log.name=cut", "train.max_steps=5", *EMA_MIX, nproc=2)  # mid-epoch 2, between EMA updates
    r = run_trainer(cfg, "log.name=cut", *EMA_MIX, nproc=2)
    assert "resumed from" in r.stdout and "step 5," in r.stdout
    for state in ("model", "ema.module"):
        full = export.model_state_dict(tmp_path / "runs/full", state)
        cut = export.model_state_dict(tmp_path / "runs/cut", state)
        assert full.keys() == cut.keys()
        for k in full:
            assert torch.equal(full[k], cut[k]), (state, k)
    ema, model = (export.model_state_dict(tmp_path / "runs/full", s) for s in ("ema.module", "model"))
    assert any(not torch.equal(ema[k], model[k]) for k in model if model[k].is_floating_point())
    summary = json.loads((tmp_path / "runs/full/summary.json").read_text())
    assert 0 <= summary["final_ema_top1"] <= 100
    printed = [line.split() for line in f.stdout.splitlines() if line.startswith("top-1 EMA final")]
    assert printed == [["top-1", "EMA", "final", f"{summary['final_ema_top1']:.2f}", "%"]]  # the summary table
    best = json.loads((tmp_path / "runs/full/checkpoints/best.json").read_text())
    assert best["top1"] == pytest.approx(summary["final_ema_top1"]) or best["top1"] >= summary["final_ema_top1"]
    assert evaluate.main([str(tmp_path / "runs/full"), "--ema"])[0]["top1"] == summary["final_ema_top1"]
    export.main([str(tmp_path / "runs/full"), str(tmp_path / "ema.pth"), "--ema"])
    saved = torch.load(tmp_path / "ema.pth", weights_only=True)
    assert saved.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in ema)
