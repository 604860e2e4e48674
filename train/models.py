"""The ResNet family by name: `build(cfg.model, num_classes)`, or `resnet(name, num_classes)` from
the table `ARCHS`, and as in torchvision a function per name (`resnet50(num_classes=10)`).

The models come from a few blocks: He et al. 2015 (v1, shortcuts A/B/C, CIFAR nets, plain
nets), He et al. 2016 (pre-activation) and torchvision's `models/resnet.py`, whose parameter names
every model here keeps where torchvision has the same model (`conv1`, `bn1`, `layer1.0.conv1`,
`layer1.0.downsample.0/1`, `fc`), so weights move both ways.

Shortcuts (paper, section 4.1):
  A  parameter-free: strided subsampling and zero-padded extra channels when the shape changes
  B  1x1 conv + BN projection only when the shape changes (torchvision's default)
  C  1x1 conv + BN projection on every block
A plain network (`residual=False`) has the same layers and no shortcut at all.

`se=True` adds squeeze-and-excitation (Hu et al. 2018, "Squeeze-and-Excitation Networks"): a
channel gate with reduction 16 on the residual branch, after its last BN (its last conv in the
pre-activation blocks), before the addition. Module names follow timm's `seresnet*`
(`layer1.0.se.fc1/fc2`), so timm's SE-ResNet-50/101 state_dicts load unchanged.

`model.weights` is a local file: a torchvision state_dict, our export (`python -m train.export`)
or a dict holding one under "model". A classifier of another shape is left freshly initialised
(transfer learning); any other mismatch is an error naming the file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from train.config import ConfigError

log = logging.getLogger("resnet")


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class SqueezeExcite(nn.Module):
    """x * sigmoid(fc2(relu(fc1(mean_hw(x))))), fc1/fc2 as biased 1x1 convs (channels -> channels
    // reduction -> channels). The paper's reduction 16 without rounding: timm rounds the hidden
    width up to a multiple of 8, which differs only below 128 channels (ResNet-18/34's first stage,
    the CIFAR nets), where timm gives 8 hidden channels and this 4 (or at least 1)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def squeeze_excite(se: bool, channels: int) -> nn.Module:
    return SqueezeExcite(channels) if se else nn.Identity()


class ShortcutA(nn.Module):
    """Option A: identity on a strided subsample, new channels filled with zeros (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.pad, self.stride = cout - cin, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad)) if self.pad else x


def make_shortcut(kind: str, cin: int, cout: int, stride: int, preact: bool = False) -> nn.Module | None:
    """None means identity. Pre-activation projections have no BN (He et al. 2016, fig. 1b)."""
    changes = stride != 1 or cin != cout
    if kind == "A":
        return ShortcutA(cin, cout, stride) if changes else None
    if kind == "C" or (kind == "B" and changes):
        if preact:
            return nn.Sequential(conv1x1(cin, cout, stride))
        return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
    if kind == "B":
        return None
    raise ValueError(f"model.shortcut: unknown option '{kind}' (A, B or C)")


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34 and the CIFAR nets)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "B", residual: bool = True,
                 groups: int = 1, base_width: int = 64, stride_in_1x1: bool = False, se: bool = False):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = squeeze_excite(se, planes)
        self.downsample = make_shortcut(shortcut, cin, planes, stride) if residual else None
        self.residual = residual

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.se(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand. Stride on the 3x3 ("ResNet v1.5", torchvision, DLE) unless
    `stride_in_1x1` (the paper's v1, ~0.5 % lower top-1 but ~5 % faster)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "B", residual: bool = True,
                 groups: int = 1, base_width: int = 64, stride_in_1x1: bool = False, se: bool = False):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(cin, width, s1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, s3, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.se = squeeze_excite(se, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(shortcut, cin, planes * self.expansion, stride) if residual else None
        self.residual = residual

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice, nothing after the addition (He et al. 2016, "full pre-activation").

    zero_init_residual has no last BN to zero here; its equivalent is a zero last conv
    (`conv2`), which makes the branch output exactly zero, so the block starts as identity.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "B", residual: bool = True,
                 groups: int = 1, base_width: int = 64, stride_in_1x1: bool = False, se: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.se = squeeze_excite(se, planes)
        self.relu = nn.ReLU(inplace=False)
        self.downsample = make_shortcut(shortcut, cin, planes, stride, preact=True) if residual else None
        self.residual = residual

    def last_conv(self) -> nn.Conv2d:
        return self.conv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.se(self.conv2(self.relu(self.bn2(self.conv1(pre)))))
        if not self.residual:
            return out
        # a projection sees the pre-activated input; an identity the raw one (He et al. 2016)
        return out + (x if self.downsample is None else self.downsample(pre))


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck; zero_init_residual zeroes `conv3` (see PreActBlock). The stride
    sits on the 3x3, or on the first 1x1 with `stride_in_1x1`, as in Bottleneck."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: str = "B", residual: bool = True,
                 groups: int = 1, base_width: int = 64, stride_in_1x1: bool = False, se: bool = False):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv1x1(cin, width, s1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, s3, groups)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=False)
        cout = planes * self.expansion
        self.se = squeeze_excite(se, cout)
        self.downsample = make_shortcut(shortcut, cin, cout, stride, preact=True) if residual else None
        self.residual = residual

    def last_conv(self) -> nn.Conv2d:
        return self.conv3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.se(self.conv3(self.relu(self.bn3(out))))
        if not self.residual:
            return out
        return out + (x if self.downsample is None else self.downsample(pre))


class ResNet(nn.Module):
    """Stem → stages `layer1..layerN` → global pool → `fc`.

    stem "imagenet": 7x7/2 conv + BN + ReLU + 3x3/2 max-pool; "cifar": 3x3/1 conv + BN + ReLU.
    Pre-activation nets end with BN + ReLU (`bn_final`) before the pool and have no BN/ReLU in
    the stem after the conv (the first block pre-activates it).
    """

    def __init__(self, block: type[nn.Module], layers: Sequence[int], num_classes: int = 1000,
                 widths: Sequence[int] = (64, 128, 256, 512), stem: str = "imagenet", stem_width: int | None = None,
                 shortcut: str = "B", residual: bool = True, zero_init_residual: bool = False,
                 groups: int = 1, width_per_group: int = 64, stride_in_1x1: bool = False, se: bool = False):
        super().__init__()
        self.preact = block in (PreActBlock, PreActBottleneck)
        stem_width = stem_width or widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem == "cifar":
            self.conv1 = conv3x3(3, stem_width)
            self.maxpool = nn.Identity()
        else:
            raise ValueError(f"model.stem: unknown stem '{stem}' (imagenet or cifar)")
        # a pre-activation CIFAR net goes from the stem conv straight into BN-ReLU of block 1
        self.stem_act = not (self.preact and stem == "cifar")
        self.bn1 = nn.BatchNorm2d(stem_width) if self.stem_act else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        cin = stem_width
        self.stage_names = []
        for i, (width, blocks) in enumerate(zip(widths, layers)):
            stage = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(block(cin, width, stride, shortcut, residual, groups, width_per_group, stride_in_1x1,
                                   se=se))
                cin = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            self.stage_names.append(f"layer{i + 1}")
        self.bn_final = nn.BatchNorm2d(cin) if self.preact else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.frozen_stages = 0
        self._init(zero_init_residual)

    def _init(self, zero_init_residual: bool) -> None:
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if hasattr(m, "last_bn"):
                    nn.init.zeros_(m.last_bn().weight)
                elif hasattr(m, "last_conv"):
                    nn.init.zeros_(m.last_conv().weight)

    def blocks(self) -> list[nn.Module]:
        return [b for name in self.stage_names for b in getattr(self, name)]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.stem_act:
            x = self.relu(self.bn1(x))
        x = self.maxpool(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if self.bn_final is not None:
            x = self.relu(self.bn_final(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))

    def frozen_modules(self) -> list[nn.Module]:
        """The stem and the first `frozen_stages` stages (set by `freeze`)."""
        if self.frozen_stages == 0:
            return []
        return [self.conv1, self.bn1] + [getattr(self, n) for n in self.stage_names[:self.frozen_stages]]

    def freeze(self, stages: int) -> None:
        """Transfer learning: stop training the stem and layer1..layer`stages`; their BN layers
        stay in eval mode (running statistics kept) even when `train()` is called."""
        if stages > len(self.stage_names):
            raise ValueError(f"model.freeze_stages: {stages} but the model has {len(self.stage_names)} stages")
        self.frozen_stages = stages
        for m in self.frozen_modules():
            m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()
        return self


CIFAR_WIDTHS = (16, 32, 64)


def _cifar_depth(depth: int, bottleneck: bool = False) -> list[int]:
    per_block = 9 if bottleneck else 6
    if (depth - 2) % per_block:
        raise ValueError(f"CIFAR ResNet depth must be {per_block}n+2, got {depth}")
    return [(depth - 2) // per_block] * 3


# name -> (block, layers, keyword arguments); `stem` and `shortcut` are the natural defaults
ARCHS: dict[str, tuple[type[nn.Module], list[int], dict]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (BasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (Bottleneck, [3, 4, 6, 3], {}),
    "resnet101": (Bottleneck, [3, 4, 23, 3], {}),
    "resnet152": (Bottleneck, [3, 8, 36, 3], {}),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}),
    "wide_resnet101_2": (Bottleneck, [3, 4, 23, 3], {"width_per_group": 128}),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}),
    "resnext101_32x8d": (Bottleneck, [3, 4, 23, 3], {"groups": 32, "width_per_group": 8}),
    "plain18": (BasicBlock, [2, 2, 2, 2], {"residual": False}),
    "plain34": (BasicBlock, [3, 4, 6, 3], {"residual": False}),
    "preact_resnet18": (PreActBlock, [2, 2, 2, 2], {}),
    "preact_resnet34": (PreActBlock, [3, 4, 6, 3], {}),
    "preact_resnet50": (PreActBottleneck, [3, 4, 6, 3], {}),
    "preact_resnet101": (PreActBottleneck, [3, 4, 23, 3], {}),
    "preact_resnet152": (PreActBottleneck, [3, 8, 36, 3], {}),
    # the CIFAR-style ResNet-18 of the common tutorials: 3x3 stem, no max-pool, 64..512 channels
    "cifar_resnet18": (BasicBlock, [2, 2, 2, 2], {"stem": "cifar"}),
    "cifar_resnet34": (BasicBlock, [3, 4, 6, 3], {"stem": "cifar"}),
    "cifar_resnet50": (Bottleneck, [3, 4, 6, 3], {"stem": "cifar"}),
    # squeeze-and-excitation (Hu et al. 2018): timm's seresnet* layout (torchvision has none)
    "seresnet18": (BasicBlock, [2, 2, 2, 2], {"se": True}),
    "seresnet34": (BasicBlock, [3, 4, 6, 3], {"se": True}),
    "seresnet50": (Bottleneck, [3, 4, 6, 3], {"se": True}),
    "seresnet101": (Bottleneck, [3, 4, 23, 3], {"se": True}),
}
for _d in (20, 32, 44, 56, 110, 1202):  # the paper's CIFAR-10 nets (table 6): option A, 16/32/64
    ARCHS[f"resnet{_d}"] = (BasicBlock, _cifar_depth(_d), {"stem": "cifar", "widths": CIFAR_WIDTHS, "shortcut": "A"})
    ARCHS[f"plain{_d}"] = (BasicBlock, _cifar_depth(_d), {"stem": "cifar", "widths": CIFAR_WIDTHS,
                                                          "residual": False})
for _d in (20, 56, 110):  # He et al. 2016's pre-activation CIFAR nets
    ARCHS[f"preact_resnet{_d}"] = (PreActBlock, _cifar_depth(_d), {"stem": "cifar", "widths": CIFAR_WIDTHS})
ARCHS["preact_resnet164"] = (PreActBottleneck, _cifar_depth(164, True), {"stem": "cifar", "widths": CIFAR_WIDTHS})


def resnet(name: str, num_classes: int = 1000, **overrides) -> ResNet:
    """Build model `name`; `overrides` (stem, shortcut, zero_init_residual, ...) replace defaults."""
    if name not in ARCHS:
        import difflib

        close = difflib.get_close_matches(name, ARCHS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"model.name: unknown model '{name}'{hint}")
    block, layers, kwargs = ARCHS[name]
    kwargs = {**kwargs, **{k: v for k, v in overrides.items() if v is not None}}
    return ResNet(block, layers, num_classes, **kwargs)


# a function per name, as torchvision.models: `resnet50(num_classes=10, shortcut="C")` is
# `resnet("resnet50", 10, shortcut="C")`; ARCHS stays the one table (a test checks every name has one)
def resnet18(**kw) -> ResNet: return resnet("resnet18", **kw)
def resnet34(**kw) -> ResNet: return resnet("resnet34", **kw)
def resnet50(**kw) -> ResNet: return resnet("resnet50", **kw)
def resnet101(**kw) -> ResNet: return resnet("resnet101", **kw)
def resnet152(**kw) -> ResNet: return resnet("resnet152", **kw)
def wide_resnet50_2(**kw) -> ResNet: return resnet("wide_resnet50_2", **kw)
def wide_resnet101_2(**kw) -> ResNet: return resnet("wide_resnet101_2", **kw)
def resnext50_32x4d(**kw) -> ResNet: return resnet("resnext50_32x4d", **kw)
def resnext101_32x8d(**kw) -> ResNet: return resnet("resnext101_32x8d", **kw)
def plain18(**kw) -> ResNet: return resnet("plain18", **kw)
def plain34(**kw) -> ResNet: return resnet("plain34", **kw)
def preact_resnet18(**kw) -> ResNet: return resnet("preact_resnet18", **kw)
def preact_resnet34(**kw) -> ResNet: return resnet("preact_resnet34", **kw)
def preact_resnet50(**kw) -> ResNet: return resnet("preact_resnet50", **kw)
def preact_resnet101(**kw) -> ResNet: return resnet("preact_resnet101", **kw)
def preact_resnet152(**kw) -> ResNet: return resnet("preact_resnet152", **kw)
def cifar_resnet18(**kw) -> ResNet: return resnet("cifar_resnet18", **kw)
def cifar_resnet34(**kw) -> ResNet: return resnet("cifar_resnet34", **kw)
def cifar_resnet50(**kw) -> ResNet: return resnet("cifar_resnet50", **kw)
def seresnet18(**kw) -> ResNet: return resnet("seresnet18", **kw)
def seresnet34(**kw) -> ResNet: return resnet("seresnet34", **kw)
def seresnet50(**kw) -> ResNet: return resnet("seresnet50", **kw)
def seresnet101(**kw) -> ResNet: return resnet("seresnet101", **kw)
def resnet20(**kw) -> ResNet: return resnet("resnet20", **kw)
def resnet32(**kw) -> ResNet: return resnet("resnet32", **kw)
def resnet44(**kw) -> ResNet: return resnet("resnet44", **kw)
def resnet56(**kw) -> ResNet: return resnet("resnet56", **kw)
def resnet110(**kw) -> ResNet: return resnet("resnet110", **kw)
def resnet1202(**kw) -> ResNet: return resnet("resnet1202", **kw)
def plain20(**kw) -> ResNet: return resnet("plain20", **kw)
def plain32(**kw) -> ResNet: return resnet("plain32", **kw)
def plain44(**kw) -> ResNet: return resnet("plain44", **kw)
def plain56(**kw) -> ResNet: return resnet("plain56", **kw)
def plain110(**kw) -> ResNet: return resnet("plain110", **kw)
def plain1202(**kw) -> ResNet: return resnet("plain1202", **kw)
def preact_resnet20(**kw) -> ResNet: return resnet("preact_resnet20", **kw)
def preact_resnet56(**kw) -> ResNet: return resnet("preact_resnet56", **kw)
def preact_resnet110(**kw) -> ResNet: return resnet("preact_resnet110", **kw)
def preact_resnet164(**kw) -> ResNet: return resnet("preact_resnet164", **kw)


__all__ = ["ARCHS", "BasicBlock", "Bottleneck", "PreActBlock", "PreActBottleneck", "ResNet", "ShortcutA",
           "SqueezeExcite", "build", "load_weights", "resnet", *ARCHS]


def load_weights(model: nn.Module, path: str) -> list[str]:
    """Load `path` into `model`; returns the keys left at their initial values (the classifier)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"model.weights: file '{path}' not found") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise ConfigError(f"model.weights: cannot read '{path}': {str(e).splitlines()[0]}") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    own = model.state_dict()
    skipped = [k for k in ("fc.weight", "fc.bias") if k in sd and k in own and sd[k].shape != own[k].shape]
    for k in skipped:
        del sd[k]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise ConfigError(f"model.weights: '{path}' does not fit this model "
                          f"({len(missing)} missing keys e.g. {missing[:2]}, {len(unexpected)} unexpected e.g. "
                          f"{unexpected[:2]}); check model.name")
    if skipped:
        log.info("model.weights: loaded %s; new classifier for %d classes (%s)", path, own["fc.weight"].shape[0],
                 ", ".join(skipped))
    return skipped


def build(cfg, num_classes: int) -> ResNet:
    """The model `cfg.name` with the config's stem, shortcut, init, weights and frozen stages."""
    overrides = {"zero_init_residual": cfg.zero_init_residual}
    if cfg.stem != "auto":
        overrides["stem"] = cfg.stem
    if cfg.shortcut != "auto":
        overrides["shortcut"] = cfg.shortcut
    if cfg.stride_in_1x1:
        overrides["stride_in_1x1"] = True
    if cfg.se:  # squeeze-and-excitation on any name; seresnet* have it already
        overrides["se"] = True
    try:
        model = resnet(cfg.name, num_classes, **overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.weights:
        load_weights(model, cfg.weights)
        if cfg.new_classifier:  # new classes: the old head's rows mean other things
            model.fc.reset_parameters()
        log.info("model.weights: loaded %s%s", cfg.weights, "; classifier re-initialised" if cfg.new_classifier else "")
    if cfg.freeze_stages:
        try:
            model.freeze(cfg.freeze_stages)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return model
