"""M3 segmentation: U-Net for left lung, right lung and heart (lung-heart-feature-weighting.txt Sec. 3.2).

A plain U-Net (Ronneberger et al.): ``depth`` down steps of two 3x3 conv+BN+ReLU
and 2x2 max pool, widths ``width * 2**i``, bilinear up-sampling, skip
concatenation, 1x1 conv to three logit channels in the order of
:data:`SEGMENTATION_CLASSES`. Trained with the Dice loss (lung-heart Eq. 2);
``M_g`` is the clipped sum of the three masks. Any input size works (decoder
features are resized to their skip connection).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrviewer.core.errors import ModelError
from cxrviewer.core.labelsets import SEGMENTATION_CLASSES  # (defined there, torch-free; re-exported)
from cxrviewer.core.models.registry import register_model



def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net returning ``{"logits": [B, 3, H, W]}`` (left lung, right lung, heart)."""

    family = "segmentation"

    def __init__(self, in_channels: int = 1, num_classes: int = len(SEGMENTATION_CLASSES),
                 width: int = 32, depth: int = 4) -> None:
        super().__init__()
        if int(width) < 1 or int(depth) < 1:
            raise ModelError(f"U-Net width and depth must be >= 1, got {width}, {depth}")
        widths = [int(width) * 2 ** i for i in range(int(depth) + 1)]
        self.down = nn.ModuleList([_double_conv(int(in_channels), widths[0])])
        for i in range(1, len(widths)):
            self.down.append(_double_conv(widths[i - 1], widths[i]))
        self.up = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.up.append(_double_conv(widths[i] + widths[i - 1], widths[i - 1]))
        self.out = nn.Conv2d(widths[0], int(num_classes), kernel_size=1)
        self.classes = SEGMENTATION_CLASSES if int(num_classes) == 3 else tuple(
            f"class_{i}" for i in range(int(num_classes)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        skips = []
        h = x
        for i, block in enumerate(self.down):
            if i > 0:
                h = F.max_pool2d(h, 2, ceil_mode=True)
            h = block(h)
            skips.append(h)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        return {"logits": self.out(h)}


@register_model(
    "unet",
    family="segmentation",
    description="U-Net segmenting left lung, right lung and heart (3 logit channels)",
    default_kwargs={"in_channels": 1, "num_classes": 3, "width": 32, "depth": 4},
    test_kwargs={"width": 4, "depth": 3},
)
def unet(**kwargs: Any) -> UNet:
    """U-Net for lung/heart masks (lung-heart-feature-weighting.txt Sec. 3.2, Eq. 2)."""
    return UNet(**kwargs)
