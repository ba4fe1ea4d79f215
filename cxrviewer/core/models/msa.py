"""M2: ResNet-MSA, multi-scale aggregation (iterative-attention-mining.txt Sec. 2.3).

The last stage ``X_k`` (2048 ch, W/2 for ResNet-50) goes through a 1x1 conv to
512 channels and is upsampled x2 (bilinear); the penultimate stage ``X_{k-1}``
(1024 ch, W) goes through a 1x1 conv to 256; the concatenation is the 768-channel
map ``X`` used by attention mining. Widths scale with the backbone: by default
each branch keeps a quarter of its input channels (ResNet-50: 512 + 256 = 768;
ResNet-18/34: 128 + 64; tiny: 32 + 16), or pass ``msa_channels=[a, b]``.

The class-specific branches (Eq. 1-3) are one linear layer ``w^c`` per class on
``GAP(X * M^c)``: ``forward(x, feature_masks=M)`` with ``M [B, C, h, w]`` (1 =
keep, 0 = erased) gives ``logit_c = w_c . GAP(X * M^c) + b_c``; without masks
``M = 1``. ``"features"`` and ``"msa"`` are ``X``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cxrviewer.core.classes import NUM_CLASSES
from cxrviewer.core.errors import ModelError
from cxrviewer.core.models.classifier import CamClassifier
from cxrviewer.core.models.registry import register_model


class MultiScaleAggregation(nn.Module):
    """``X = [up2(conv1x1(X_k)), conv1x1(X_{k-1})]`` (attention-mining Sec. 2.3)."""

    def __init__(self, last_channels: int, penultimate_channels: int,
                 out_last: int, out_penultimate: int) -> None:
        super().__init__()
        self.reduce_last = nn.Conv2d(last_channels, out_last, kernel_size=1)
        self.reduce_penultimate = nn.Conv2d(penultimate_channels, out_penultimate, kernel_size=1)

    def forward(self, penultimate: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.reduce_last(last), size=penultimate.shape[-2:],
                           mode="bilinear", align_corners=False)
        return torch.cat([up, self.reduce_penultimate(penultimate)], dim=1)


class MSAClassifier(CamClassifier):
    """ResNet-MSA with class-specific GAP branches (attention-mining Eq. 1-3)."""

    def __init__(self, backbone: str = "resnet50", num_classes: int = NUM_CLASSES,
                 in_channels: int = 1, msa_channels: Sequence[int] | None = None) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, in_channels=in_channels)
        c4, c5 = self.backbone.channels["stage4"], self.backbone.channels["stage5"]
        if msa_channels is None:
            out_last, out_pen = c5 // 4, c4 // 4
        else:
            if len(msa_channels) != 2:
                raise ModelError(f"msa_channels must be [last, penultimate], got {msa_channels}")
            out_last, out_pen = (int(v) for v in msa_channels)
        self.msa = MultiScaleAggregation(c5, c4, out_last, out_pen)
        self.feature_channels = out_last + out_pen
        self.classifier = nn.Linear(self.feature_channels, self.num_classes)

    def extract(self, x: torch.Tensor, **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        stages = self.backbone(x)
        msa = self.msa(stages["stage4"], stages["stage5"])
        out = dict(stages)
        out["msa"] = msa
        return msa, out

    def feature_layer(self) -> nn.Module:
        return self.msa


@register_model(
    "msa",
    family="classifier",
    description="M2 ResNet-MSA: last two stages aggregated at 2x resolution, class-specific GAP branches",
    default_kwargs={"backbone": "resnet50", "num_classes": NUM_CLASSES, "in_channels": 1,
                    "msa_channels": None},
    test_kwargs={"backbone": "tiny"},
)
def msa(**kwargs: Any) -> MSAClassifier:
    """ResNet-MSA (iterative-attention-mining.txt Sec. 2.3, Eq. 1-3)."""
    return MSAClassifier(**kwargs)
