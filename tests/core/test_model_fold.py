"""BatchNorm folding for inference (cxrviewer/core/models/fold.py): every registered network gives
the same outputs folded, only pairs of known data flow are folded, and training models are left."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cxrviewer.core.models import create_model, list_models
from cxrviewer.core.models.backbones import build_backbone
from cxrviewer.core.models.fold import fold_batchnorm, is_folded


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters (fresh BN layers are near identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def _flat(out) -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"out": out}
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("spec", list_models(), ids=lambda s: s.name)
def test_every_registered_network_gives_the_same_outputs_folded(spec) -> None:
    torch.manual_seed(0)
    model = create_model(spec.name, **spec.test_kwargs).eval()
    _randomise_bn(model)
    inputs = spec.example_inputs(batch=2, size=64)
    with torch.no_grad():
        ref = _flat(model(*inputs))
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        folded = fold_batchnorm(model)
        got = _flat(model(*inputs))
    assert is_folded(model) and folded > 0 and n_bn > 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn - folded
    for k, v in ref.items():
        span = float(v.abs().max()) or 1.0
        assert float((got[k] - v).abs().max()) <= 1e-4 * span, (spec.name, k)
    assert fold_batchnorm(model) == 0  # once


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet121"])
def test_torchvision_blocks_fold_every_conv_bn_pair(name: str) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, 1).eval()
    _randomise_bn(net, 1)
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        ref = net(x)["stage5"]
        fold_batchnorm(net)
        got = net(x)["stage5"]
    left = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    # ResNets: every BN follows a convolution; DenseNet: norm1 of each layer, the transitions' norms
    # and norm5 take concatenations, not a convolution's output, so they stay
    assert left == 0 if name.startswith("resnet") else 0 < left < 130
    assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


class _BnFirst(nn.Module):
    """Registers conv then bn but applies bn first: adjacency in registration order says nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_unknown_modules_and_training_models_are_left_alone() -> None:
    torch.manual_seed(0)
    m = _BnFirst().eval()
    _randomise_bn(m)
    before = copy.deepcopy(m)
    assert fold_batchnorm(m) == 0 and isinstance(m.bn, nn.BatchNorm2d)
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(m(x), before(x))
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    assert fold_batchnorm(seq) == 0 and not is_folded(seq)  # batch statistics: nothing to fold
