"""Cross-rank BN on CPU: 2 ranks on halves of a batch == plain BatchNorm on the whole batch."""

import torch
from torch import nn

from tests.distributed_helpers import run_ranks
from train.sync_batchnorm import CrossRankBatchNorm2d, convert


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 5, 5, generator=g) * 3 + 1, torch.randn(8, 3, 5, 5, generator=g)


def reference():
    x, w = batch()
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x.requires_grad_(True)
    y = bn(x)
    (y * w).sum().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def shard(rank, world):
    torch.manual_seed(0)
    x, w = batch()
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn = convert(bn, torch.device("cpu"))
    assert isinstance(bn, CrossRankBatchNorm2d)
    lo, hi = rank * 8 // world, (rank + 1) * 8 // world
    xs = x[lo:hi].clone().requires_grad_(True)
    y = bn(xs)
    (y * w[lo:hi]).sum().backward()
    # parameter grads are per-rank partial sums here (DDP would add them)
    return y.detach(), xs.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def test_two_ranks_equal_one_batch():
    torch.manual_seed(0)
    y, gx, gw, gb, rm, rv = reference()
    (y0, gx0, gw0, gb0, rm0, rv0), (y1, gx1, gw1, gb1, rm1, rv1) = run_ranks(shard, 2)
    torch.testing.assert_close(torch.cat([y0, y1]), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([gx0, gx1]), gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw0 + gw1, gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb0 + gb1, gb, rtol=1e-5, atol=1e-5)
    for r_m, r_v in ((rm0, rv0), (rm1, rv1)):
        torch.testing.assert_close(r_m, rm)
        torch.testing.assert_close(r_v, rv)


def test_single_process_is_plain_bn():
    torch.manual_seed(0)
    y, gx, *_ = reference()
    torch.manual_seed(0)
    y1, gx1, *_ = shard(0, 1)
    torch.testing.assert_close(y1, y)
    torch.testing.assert_close(gx1, gx)
