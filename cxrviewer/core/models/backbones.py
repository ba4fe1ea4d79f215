"""Backbones with stage outputs: ResNet-18/34/50, DenseNet-121 (torchvision, no weights) and "tiny".

Every backbone is a :class:`Backbone` with a ``stem`` and four stages named after
the usual C2..C5 convention, so ``stage4`` is ResNet's ``layer3`` (1024 ch for
ResNet-50, stride 16) and ``stage5`` its ``layer4`` (2048 ch, stride 32) — the
"C4"/"C5" of cia-net-alignment-contrast-attention.txt Sec. 3.2 and the
"penultimate/last bottleneck" of iterative-attention-mining.txt Sec. 2.3.

===========  ======================  ======================  =====================
backbone     stage2..stage5 channels  strides                 notes
===========  ======================  ======================  =====================
resnet18     64, 128, 256, 512        4, 8, 16, 32            BasicBlock
resnet34     64, 128, 256, 512        4, 8, 16, 32            BasicBlock
resnet50     256, 512, 1024, 2048     4, 8, 16, 32            Bottleneck
densenet121  256, 512, 1024, 1024     4, 8, 16, 32            dense blocks 1-4; stage5 ends with norm5+ReLU
tiny         16, 32, 64, 128          4, 8, 16, 32            2 convs per stage, for tests and demos
===========  ======================  ======================  =====================

The first convolution takes ``in_channels`` (default 1, grayscale). Weights are
never downloaded (``weights=None``); the networks are trained from scratch or
loaded from a bundle.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm

from cxrviewer.core.errors import ModelError

STAGES: tuple[str, ...] = ("stage2", "stage3", "stage4", "stage5")


class Backbone(nn.Module):
    """A stem plus four stages; ``forward`` returns ``{"stage2": ..., "stage5": ...}``."""

    def __init__(self, name: str, stem: nn.Module, stages: dict[str, nn.Module],
                 channels: dict[str, int]) -> None:
        super().__init__()
        self.name = name
        self.stem = stem
        self.stages = nn.ModuleDict(stages)
        self.channels: dict[str, int] = dict(channels)
        self.strides: dict[str, int] = {"stage2": 4, "stage3": 8, "stage4": 16, "stage5": 32}

    @property
    def out_channels(self) -> int:
        """Channels of the last stage (the CAM feature map)."""
        return self.channels["stage5"]

    def forward(self, x: torch.Tensor, until: str = "stage5") -> dict[str, torch.Tensor]:
        """Stage outputs up to and including ``until``."""
        if until not in STAGES:
            raise ModelError(f"unknown backbone stage {until!r}; expected one of {STAGES}")
        out: dict[str, torch.Tensor] = {}
        h = self.stem(x)
        for name in STAGES:
            h = self.stages[name](h)
            out[name] = h
            if name == until:
                break
        return out


def _first_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _resnet(name: str, ctor: Callable[..., nn.Module], in_channels: int) -> Backbone:
    net = ctor(weights=None)
    net.conv1 = _first_conv(in_channels, 64)
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = {"stage2": net.layer1, "stage3": net.layer2, "stage4": net.layer3, "stage5": net.layer4}
    exp = 4 if name == "resnet50" else 1
    channels = {"stage2": 64 * exp, "stage3": 128 * exp, "stage4": 256 * exp, "stage5": 512 * exp}
    return Backbone(name, stem, stages, channels)


def _densenet121(in_channels: int) -> Backbone:
    f = tvm.densenet121(weights=None).features
    f.conv0 = _first_conv(in_channels, 64)
    stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)
    stages = {
        "stage2": f.denseblock1,
        "stage3": nn.Sequential(f.transition1, f.denseblock2),
        "stage4": nn.Sequential(f.transition2, f.denseblock3),
        # torchvision applies ReLU after norm5 in DenseNet.forward; keep it in the stage.
        "stage5": nn.Sequential(f.transition3, f.denseblock4, f.norm5, nn.ReLU(inplace=False)),
    }
    channels = {"stage2": 256, "stage3": 512, "stage4": 1024, "stage5": 1024}
    return Backbone("densenet121", stem, stages, channels)


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _tiny(in_channels: int, widths: tuple[int, ...] = (16, 32, 64, 128)) -> Backbone:
    stem = nn.Sequential(*_conv_bn_relu(in_channels, widths[0], 2))
    stages = {}
    cin = widths[0]
    for name, w in zip(STAGES, widths):
        stages[name] = nn.Sequential(*_conv_bn_relu(cin, w, 2), *_conv_bn_relu(w, w))
        cin = w
    for m in nn.ModuleList(stages.values()).modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return Backbone("tiny", stem, stages, dict(zip(STAGES, widths)))


BACKBONES: dict[str, Callable[[int], Backbone]] = {
    "resnet18": lambda c: _resnet("resnet18", tvm.resnet18, c),
    "resnet34": lambda c: _resnet("resnet34", tvm.resnet34, c),
    "resnet50": lambda c: _resnet("resnet50", tvm.resnet50, c),
    "densenet121": _densenet121,
    "tiny": _tiny,
}


def build_backbone(name: str, in_channels: int = 1) -> Backbone:
    """Build backbone ``name`` (one of :data:`BACKBONES`) taking ``in_channels`` inputs."""
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if int(in_channels) < 1:
        raise ModelError(f"in_channels must be >= 1, got {in_channels}")
    return BACKBONES[name](int(in_channels))
