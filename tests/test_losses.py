"""Training losses: hard labels and soft targets, label smoothing, BCE as timm computes it."""

import pytest
import torch
from torch import nn

from train.config import ConfigError, OptimConfig, load
from train.optim import BinaryCrossEntropy, CrossEntropy, build_criterion

N, C = 8, 5


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(N, C, generator=g) * 3
    labels = torch.randint(0, C, (N,), generator=g)
    other = torch.randint(0, C, (N,), generator=g)
    lam = torch.rand(N, 1, generator=g)
    mixed = lam * nn.functional.one_hot(labels, C) + (1 - lam) * nn.functional.one_hot(other, C)
    return logits, labels, mixed.float()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_ce_equals_torch_on_hard_labels_and_one_hot_targets(batch, smoothing):
    logits, labels, _ = batch
    loss = build_criterion(OptimConfig(label_smoothing=smoothing))
    assert isinstance(loss, CrossEntropy)
    want = nn.CrossEntropyLoss(label_smoothing=smoothing)(logits, labels)
    assert torch.equal(loss(logits, labels), want)
    torch.testing.assert_close(loss(logits, nn.functional.one_hot(labels, C).float()), want)


def test_ce_soft_targets_are_smoothed_after_mixing(batch):
    """Smoothing the mix equals mixing smoothed labels (timm's Mixup): the smoothing is affine."""
    logits, _, mixed = batch
    s = 0.1
    by_hand = -(((1 - s) * mixed + s / C) * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(build_criterion(OptimConfig(label_smoothing=s))(logits, mixed), by_hand)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bce_sum", [False, True])
@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_bce_equals_timm(batch, smoothing, bce_sum, threshold):
    timm_loss = pytest.importorskip("timm.loss")
    logits, labels, mixed = batch
    cfg = OptimConfig(loss="bce", label_smoothing=smoothing, bce_sum=bce_sum, bce_target_threshold=threshold)
    ours = build_criterion(cfg)
    assert isinstance(ours, BinaryCrossEntropy)
    theirs = timm_loss.BinaryCrossEntropy(smoothing=smoothing, sum_classes=bce_sum,
                                          target_threshold=threshold or None)
    torch.testing.assert_close(ours(logits, labels), theirs(logits, labels))  # timm one-hots and smooths
    # soft targets: timm's Mixup smooths each label before mixing, its loss takes them as they are
    smoothed = mixed * (1 - smoothing) + smoothing / C
    torch.testing.assert_close(ours(logits, mixed), theirs(logits, smoothed))


def test_bce_reductions_by_hand(batch):
    logits, labels, _ = batch
    t = nn.functional.one_hot(labels, C).float()
    per = -(t * nn.functional.logsigmoid(logits) + (1 - t) * nn.functional.logsigmoid(-logits))
    torch.testing.assert_close(build_criterion(OptimConfig(loss="bce"))(logits, labels), per.mean())
    torch.testing.assert_close(build_criterion(OptimConfig(loss="bce", bce_sum=True))(logits, labels),
                               per.sum(-1).mean())


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_low_precision_logits_and_gradients(batch, loss):
    logits, labels, mixed = batch
    crit = build_criterion(OptimConfig(loss=loss, label_smoothing=0.1))
    x = logits.bfloat16().requires_grad_()
    for targets in (labels, mixed):
        out = crit(x, targets)
        assert out.dtype == torch.float32 and out.ndim == 0
        torch.testing.assert_close(out, crit(x.detach().float(), targets))
        out.backward()
        assert x.grad.dtype == torch.bfloat16 and x.grad.abs().sum() > 0
        x.grad = None


def test_config_keys():
    cfg = load(None, ["optim.loss=bce", "optim.bce_target_threshold=0.2", "optim.bce_sum=true"], check_data=False)
    assert (cfg.optim.loss, cfg.optim.bce_target_threshold, cfg.optim.bce_sum) == ("bce", 0.2, True)
    with pytest.raises(ConfigError, match="optim.loss: 'focal' is not one of ce, bce"):
        load(None, ["optim.loss=focal"], check_data=False)
    with pytest.raises(ConfigError, match=r"optim.bce_target_threshold: must be in \[0, 1\)"):
        load(None, ["optim.bce_target_threshold=1.5"], check_data=False)
