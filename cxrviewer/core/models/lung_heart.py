"""M3: lung/heart feature weighting + multi-scale spatial attention (lung-heart-feature-weighting.txt Sec. 3).

Multi-scale attention on the input (Sec. 3.1, implementation details): the image
is scale 0; a conv with kernel 5, stride 2 gives scale 1 (H/2); a conv with
kernel 9, stride 2 on scale 1 gives scale 2 (H/4) (the paper's "spatial feature
hierarchy"). Each scale is reduced to its channel max and channel mean, upsampled
to H x W, and the six maps are merged by a 7x7 conv into one ``1 x H x W`` map;
after a sigmoid it multiplies the image before the backbone.

Feature weighting (Sec. 3.2, Eq. 3): the backbone's last feature map ``F_g``
(DenseNet-121 by default) is multiplied by the lung/heart mask ``M_g``
adaptive-average-pooled to the feature size, ``F_l = F_g * M_g``; then GAP ->
linear. ``forward(x, lung_heart_mask=None)`` takes ``M_g`` as ``[B, 1, H, W]`` in
[0, 1] (None -> all ones, i.e. no weighting); a ``[B, k, H, W]`` input (e.g. the
three U-Net masks) is merged by pixel-wise sum clipped to [0, 1] as in Sec. 3.2.

Outputs: ``"features"`` = ``F_l`` (what the CAM and the GAP see), ``"cam"`` =
``W F_l``, ``"global_features"`` = ``F_g``, ``"input_attention"`` ``[B,1,H,W]``,
``"mask"`` = pooled ``M_g`` ``[B,1,h,w]``, stage maps.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrviewer.core.classes import NUM_CLASSES
from cxrviewer.core.errors import ModelError
from cxrviewer.core.models.classifier import CamClassifier
from cxrviewer.core.models.registry import image_inputs, register_model


class MultiScaleSpatialAttention(nn.Module):
    """Input attention map from three scales of channel max/mean (lung-heart Sec. 3.1)."""

    def __init__(self, in_channels: int = 1, channels: int = 8, merge_kernel: int = 7) -> None:
        super().__init__()
        self.conv5 = nn.Sequential(nn.Conv2d(in_channels, channels, 5, stride=2, padding=2), nn.ReLU(inplace=True))
        self.conv9 = nn.Sequential(nn.Conv2d(channels, channels, 9, stride=2, padding=4), nn.ReLU(inplace=True))
        self.merge = nn.Conv2d(6, 1, merge_kernel, padding=merge_kernel // 2)

    @staticmethod
    def _max_mean(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.amax(1, keepdim=True), t.mean(1, keepdim=True)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid attention map ``[B, 1, H, W]``."""
        s1 = self.conv5(x)
        s2 = self.conv9(s1)
        size = x.shape[-2:]
        maps = [self._max_mean(x)]
        for s in (s1, s2):
            maps.append(F.interpolate(self._max_mean(s), size=size, mode="bilinear", align_corners=False))
        return torch.sigmoid(self.merge(torch.cat(maps, dim=1)))


class FeatureWeighting(nn.Module):
    """``F_l = F_g * AdaptiveAvgPool(M_g)`` (lung-heart Eq. 3); its output is ``"features"``."""

    def forward(self, f_g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return f_g * mask


class LungHeartClassifier(CamClassifier):
    """Multi-scale input attention + backbone + lung/heart feature weighting (lung-heart Eq. 3)."""

    def __init__(self, backbone: str = "densenet121", num_classes: int = NUM_CLASSES,
                 in_channels: int = 1, attention_channels: int = 8) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, in_channels=in_channels)
        self.input_attention = MultiScaleSpatialAttention(in_channels, int(attention_channels))
        self.weighting = FeatureWeighting()

    def extract(self, x: torch.Tensor, lung_heart_mask: torch.Tensor | None = None,
                **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = self.input_attention(x)
        stages = self.backbone(x * a)
        f_g = stages["stage5"]
        if lung_heart_mask is None:
            m = f_g.new_ones(f_g.shape[0], 1, *f_g.shape[-2:])
        else:
            m = lung_heart_mask.to(device=f_g.device, dtype=f_g.dtype)
            if m.dim() != 4 or m.shape[0] not in (1, f_g.shape[0]):
                raise ModelError(f"lung_heart_mask must be [B, 1, H, W], got shape {tuple(m.shape)}")
            if m.shape[1] != 1:
                m = m.sum(1, keepdim=True).clamp(0, 1)
            m = F.adaptive_avg_pool2d(m, f_g.shape[-2:])
        f_l = self.weighting(f_g, m)
        out = dict(stages)
        out.update(global_features=f_g, input_attention=a, mask=m)
        return f_l, out

    def feature_layer(self) -> nn.Module:
        return self.weighting

    def forward(self, x: torch.Tensor, lung_heart_mask: torch.Tensor | None = None,
                feature_masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        f, out = self.extract(x, lung_heart_mask=lung_heart_mask)
        return self.head(f, out, feature_masks)


def _lung_heart_inputs(batch: int, size: int, in_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    (x,) = image_inputs(batch, size, in_channels)
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, size // 8: size - size // 8, size // 8: size - size // 8] = 1.0
    return x, mask


@register_model(
    "lung_heart",
    family="classifier",
    description="M3 multi-scale input attention + lung/heart feature weighting F_l = F_g * M_g",
    default_kwargs={"backbone": "densenet121", "num_classes": NUM_CLASSES, "in_channels": 1,
                    "attention_channels": 8},
    test_kwargs={"backbone": "tiny"},
    inputs=_lung_heart_inputs,
)
def lung_heart(**kwargs: Any) -> LungHeartClassifier:
    """Lung/heart feature-weighting classifier (lung-heart-feature-weighting.txt Eq. 3)."""
    return LungHeartClassifier(**kwargs)
