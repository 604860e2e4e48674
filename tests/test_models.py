"""The ResNet family: torchvision interchangeability, the paper's numbers, init and transfer."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import train.models
from train.config import ConfigError, ModelConfig
from train.models import ARCHS, ShortcutA, build, resnet

TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "resnext50_32x4d"]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomise_bn(m: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) - 0.5)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=g) - 0.5)


@pytest.mark.parametrize("name, count", [
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),
    ("resnet101", 44_549_160), ("resnet152", 60_192_808),
])
def test_imagenet_parameter_counts(name, count):
    assert n_params(resnet(name)) == count == n_params(getattr(torchvision.models, name)())


@pytest.mark.parametrize("name, millions", [("resnet20", 0.27), ("resnet56", 0.85), ("resnet110", 1.7)])
def test_cifar_parameter_counts_match_paper(name, millions):
    assert n_params(resnet(name, 10)) / 1e6 == pytest.approx(millions, rel=0.03)  # the paper rounds


def test_shortcut_a_adds_no_parameters():
    a, b, c = (n_params(resnet("resnet56", 10, shortcut=s)) for s in "ABC")
    assert a == n_params(resnet("plain56", 10)) < b < c
    assert any(isinstance(m, ShortcutA) for m in resnet("resnet56", 10).modules())


@pytest.mark.parametrize("name", TORCHVISION)
def test_outputs_equal_torchvision_both_directions(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)()
    randomise_bn(tv)
    ours = resnet(name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    tv.eval(), ours.eval()
    with torch.no_grad():
        assert (ours(x) - tv(x)).abs().max() <= 1e-5
        back = getattr(torchvision.models, name)()
        randomise_bn(ours, seed=1)
        back.load_state_dict(ours.state_dict())
        back.eval()
        assert (back(x) - ours(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                                  "resnext50_32x4d", "plain18", "plain34", "preact_resnet18", "preact_resnet50",
                                  "cifar_resnet18"])
def test_output_shape_224(name):
    with torch.no_grad():
        assert resnet(name, 7).eval()(torch.randn(1, 3, 224, 224)).shape == (1, 7)


@pytest.mark.parametrize("name", [n for n in ARCHS if ARCHS[n][2].get("stem") == "cifar" and n != "resnet1202"])
def test_output_shape_32(name):
    with torch.no_grad():
        assert resnet(name, 10).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet50_flops():
    model = resnet("resnet50").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    gmacs = counter.get_total_flops() / 2 / 1e9
    assert gmacs == pytest.approx(4.1, rel=0.02)


def branch_outputs(model: nn.Module) -> list[torch.Tensor]:
    """What each residual branch adds in one real forward: the output of its last BN (post-
    activation blocks) or of its last conv (pre-activation blocks), caught by hooks."""
    outs = []
    ends = [b.last_bn() if hasattr(b, "last_bn") else b.last_conv() for b in model.blocks()]
    hooks = [m.register_forward_hook(lambda m, inp, out: outs.append(out)) for m in ends]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(outs) == len(model.blocks())
    return outs


@pytest.mark.parametrize("name", ["resnet50", "resnet18", "resnet20", "preact_resnet18", "preact_resnet164"])
def test_zero_init_residual_blocks_start_as_identity(name):
    assert all(torch.count_nonzero(o) == 0 for o in branch_outputs(resnet(name, 10, zero_init_residual=True).train()))
    assert all(torch.count_nonzero(o) > 0 for o in branch_outputs(resnet(name, 10, zero_init_residual=False).train()))


def depth_gradient_ratio(name: str) -> float:
    """|grad of the first conv| / |grad of the classifier| at initialisation, in train mode."""
    torch.manual_seed(0)
    model = resnet(name, 10).train()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    return model.conv1.weight.grad.norm().item() / model.fc.weight.grad.norm().item()


def test_gradient_highway_resnet56_vs_plain56():
    """The shortcut keeps the gradient that reaches conv1 on the scale of the classifier's; the
    plain net's does not. Measured, the plain net's gradient *explodes* with depth (with BN in
    train mode, Yang et al. 2019) rather than vanishing: as the paper says (sec. 4.1), BN keeps
    plain nets from vanishing gradients, and their degradation has another cause."""
    res, plain = depth_gradient_ratio("resnet56"), depth_gradient_ratio("plain56")
    print(f"\n|grad conv1|/|grad fc| at init: resnet56 {res:.3g}, plain56 {plain:.3g}, ratio {plain / res:.0f}")
    assert 0.1 < res < 10  # resnet56: the gradient arrives at the bottom on the scale it left the top
    assert plain / res > 100  # plain56: off by orders of magnitude


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "resnet20", "preact_resnet18", "plain20"])
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    a = resnet(name, 10)
    randomise_bn(a)
    a.eval()  # fixed BN statistics: batch statistics of a 2-image batch amplify rounding noise
    b = resnet(name, 10).eval()
    b.load_state_dict(a.state_dict())
    b = b.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    ya, yb = a(x), b(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-4)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(b.conv1.weight.grad, a.conv1.weight.grad, rtol=1e-3, atol=1e-4)


def test_stride_in_1x1_moves_the_stride():
    v1 = resnet("resnet50", stride_in_1x1=True)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    v15 = resnet("resnet50")
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)


def test_preact_bottleneck_stride_in_1x1():
    v1 = build(ModelConfig(name="preact_resnet50", stride_in_1x1=True), 10)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    v2 = build(ModelConfig(name="preact_resnet50"), 10)
    assert v2.layer2[0].conv1.stride == (1, 1) and v2.layer2[0].conv2.stride == (2, 2)
    with torch.no_grad():
        assert v1.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("name", TORCHVISION + ["resnext101_32x8d", "wide_resnet101_2"])
def test_named_factories_like_torchvision(name):
    """`train.models.resnet50(num_classes=10)`: torchvision's state_dict, and the by-name build."""
    make = getattr(train.models, name)
    assert make.__name__ == name and name in train.models.__all__
    torch.manual_seed(0)
    ours = make(num_classes=10)
    tv = getattr(torchvision.models, name)(num_classes=10)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    torch.manual_seed(0)
    by_name = resnet(name, 10)
    assert all(torch.equal(v, by_name.state_dict()[k]) for k, v in ours.state_dict().items())


def test_every_registered_name_has_a_factory():
    for name in ARCHS:
        assert getattr(train.models, name).__name__ == name
    m = train.models.resnet20(num_classes=10, shortcut="B")
    assert not any(isinstance(x, ShortcutA) for x in m.modules())


def test_weights_file_torchvision_and_checkpoint_formats(tmp_path):
    tv = torchvision.models.resnet18(num_classes=10)
    randomise_bn(tv)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    torch.save({"model": {f"module.{k}": v for k, v in tv.state_dict().items()}}, tmp_path / "ckpt.pth")
    x = torch.randn(1, 3, 64, 64)
    tv.eval()
    for f in ("tv.pth", "ckpt.pth"):
        m = build(ModelConfig(name="resnet18", weights=str(tmp_path / f)), 10).eval()
        torch.testing.assert_close(m(x), tv(x), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="model.weights: '.*tv.pth' does not fit this model"):
        build(ModelConfig(name="resnet34", weights=str(tmp_path / "tv.pth")), 10)
    with pytest.raises(ConfigError, match="model.weights: file 'nope.pth' not found"):
        build(ModelConfig(name="resnet18", weights="nope.pth"), 10)


def test_transfer_learning_new_classifier_and_frozen_stages(tmp_path):
    src = resnet("resnet18", 5)
    randomise_bn(src)
    torch.save(src.state_dict(), tmp_path / "src.pth")
    m = build(ModelConfig(name="resnet18", weights=str(tmp_path / "src.pth"), freeze_stages=2), 3)
    assert m.fc.out_features == 3
    assert torch.equal(m.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in m.named_parameters() if n.startswith(("conv1", "bn1", "layer1", "layer2"))}
    m.train()
    assert not m.bn1.training and not m.layer2[1].bn2.training and m.layer3[0].bn1.training
    before = m.layer1[0].bn1.running_mean.clone()
    m(torch.randn(4, 3, 64, 64))
    assert torch.equal(m.layer1[0].bn1.running_mean, before)  # frozen BN statistics do not move
    assert not torch.equal(m.layer3[0].bn1.running_mean, src.layer3[0].bn1.running_mean)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="model.name: unknown model 'resnet5'; did you mean 'resnet56'"):
        build(ModelConfig(name="resnet5"), 10)


def test_new_classifier_resets_the_head_of_same_size(tmp_path):
    src = resnet("resnet20", 5)
    torch.save(src.state_dict(), tmp_path / "src.pth")
    kept = build(ModelConfig(name="resnet20", weights=str(tmp_path / "src.pth")), 5)
    fresh = build(ModelConfig(name="resnet20", weights=str(tmp_path / "src.pth"), new_classifier=True), 5)
    assert torch.equal(kept.fc.weight, src.fc.weight) and not torch.equal(fresh.fc.weight, src.fc.weight)
    assert torch.equal(fresh.layer3[2].conv2.weight, src.layer3[2].conv2.weight)


SE_COUNTS = {"seresnet50": 28_088_024, "seresnet101": 49_326_872}  # timm's seresnet50/101, 1000 classes


def se_params(channels: list[int]) -> int:
    """Parameters of one SE gate per block output width c: fc1 (c -> c/16, bias), fc2 (back, bias)."""
    return sum(2 * c * max(1, c // 16) + max(1, c // 16) + c for c in channels)


def test_se_resnet_parameter_counts_and_outputs_match_timm():
    timm = pytest.importorskip("timm")
    assert n_params(resnet("seresnet101")) == SE_COUNTS["seresnet101"]
    ours = resnet("seresnet50")
    assert n_params(ours) == SE_COUNTS["seresnet50"]
    theirs = timm.create_model("seresnet50", pretrained=False)
    assert n_params(theirs) == SE_COUNTS["seresnet50"]
    randomise_bn(theirs)
    ours.load_state_dict(theirs.state_dict())  # same names and shapes: timm's weights load as they are
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-4, atol=1e-5)


def test_se_resnet18_34_use_the_papers_reduction():
    """16 without timm's rounding to multiples of 8: 4 hidden channels at 64 (timm: 8)."""
    for name, layers in (("seresnet18", [2, 2, 2, 2]), ("seresnet34", [3, 4, 6, 3])):
        widths = [w for w, k in zip((64, 128, 256, 512), layers) for _ in range(k)]
        assert n_params(resnet(name)) == n_params(resnet(name.removeprefix("se"))) + se_params(widths)
    assert resnet("seresnet18").layer1[0].se.fc1.out_channels == 4


@pytest.mark.parametrize("name", ["seresnet34", "seresnet101"])
def test_se_output_shape(name):
    with torch.no_grad():
        assert resnet(name, 7).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("name, kw", [("seresnet18", {}), ("seresnet50", {}), ("preact_resnet18", {"se": True}),
                                      ("preact_resnet50", {"se": True}), ("resnet20", {"se": True})])
def test_se_gradients_reach_every_gate(name, kw):
    torch.manual_seed(0)
    model = resnet(name, 7, zero_init_residual=False, **kw).train()
    gates = [m for m in model.modules() if isinstance(m, train.models.SqueezeExcite)]
    assert len(gates) == len(model.blocks())
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 7)
    nn.functional.cross_entropy(out, torch.randint(0, 7, (4,))).backward()
    assert all(p.grad is not None for g in gates for p in g.parameters())
    # fc2's bias sees the gradient of every gate; fc1's can be 0 where a hidden ReLU is off for
    # the whole batch (1 to 4 hidden units in the CIFAR nets)
    assert all(g.fc2.bias.grad.abs().sum() > 0 for g in gates)
    assert sum(g.fc1.weight.grad.abs().sum() > 0 for g in gates) >= 0.8 * len(gates)


@pytest.mark.parametrize("name, kw", [("seresnet50", {}), ("preact_resnet18", {"se": True})])
def test_se_blocks_start_as_identity_with_zero_init_residual(name, kw):
    model = resnet(name, 10, zero_init_residual=True, **kw).train()
    outs = []
    hooks = [m.se.register_forward_hook(lambda m, i, o: outs.append(o)) for m in model.blocks()]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(outs) == len(model.blocks()) and all(torch.count_nonzero(o) == 0 for o in outs)


def test_model_se_option_and_plain_names_keep_torchvision_keys():
    m = build(ModelConfig(name="resnet50", se=True), 10)
    assert n_params(m) == n_params(resnet("seresnet50", 10))
    assert set(resnet("resnet50").state_dict()) == set(torchvision.models.resnet50().state_dict())
