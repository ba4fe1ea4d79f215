"""M1: disease-mask (DM) attention classifier (disease-masks-attention.txt Sec. 3.1.2).

Attention-guided features ``f'_c = psi_c * f + f`` (Eq. 4) per class and the
attention-guided CAM ``S^_c = sum_k w_k^c f'_k`` (Eq. 5). Because psi_c is a
spatial map shared by all channels, ``S^_c = (1 + psi_c) * sum_k w_k^c f_k``: the
model computes the plain CAM once and scales it, never C copies of ``f``. The
logit is the GAP of the class-specific CAM plus the bias (Eq. 2), so with
``psi = 0`` the model is exactly the baseline CAM classifier.

``disease_masks`` is a persistent buffer ``[C, mask_size, mask_size]`` (zeros
until :meth:`set_disease_masks`; saved in the state dict; fixed shape so bundles
load), bilinearly resized to the feature grid inside ``forward``. ``"features"``
is ``f`` (before psi), ``"cam"`` is Eq. 5.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cxrviewer.core.classes import NUM_CLASSES
from cxrviewer.core.errors import ModelError
from cxrviewer.core.models.classifier import CamClassifier
from cxrviewer.core.models.registry import register_model


class DiseaseMaskClassifier(CamClassifier):
    """CAM classifier with class-specific disease-mask attention (Eq. 4-5)."""

    disease_masks: torch.Tensor

    def __init__(self, backbone: str = "resnet50", num_classes: int = NUM_CLASSES,
                 in_channels: int = 1, transition_channels: int | None = None,
                 mask_size: int = 16) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, in_channels=in_channels,
                         transition_channels=transition_channels, pool="avg")
        if int(mask_size) < 1:
            raise ModelError(f"mask_size must be >= 1, got {mask_size}")
        self.register_buffer("disease_masks", torch.zeros(self.num_classes, int(mask_size), int(mask_size)))

    def set_disease_masks(self, psi: torch.Tensor) -> None:
        """Store psi ``[C, h, w]`` (Eq. 3 output, values in [0, 1]), resized to the buffer size."""
        psi = torch.as_tensor(psi, dtype=self.disease_masks.dtype)
        if psi.dim() != 3 or psi.shape[0] != self.num_classes:
            raise ModelError(f"disease masks must be [{self.num_classes}, h, w], got {tuple(psi.shape)}")
        if not torch.isfinite(psi).all():
            raise ModelError("disease masks contain NaN or infinite values")
        size = self.disease_masks.shape[-2:]
        if psi.shape[-2:] != size:
            psi = F.interpolate(psi[None], size=size, mode="bilinear", align_corners=False)[0]
        with torch.no_grad():
            self.disease_masks.copy_(psi.to(self.disease_masks.device))

    def masks_at(self, size: torch.Size | tuple[int, int]) -> torch.Tensor:
        """psi resized to ``size`` (the feature grid), ``[C, h, w]``."""
        psi = self.disease_masks
        if tuple(psi.shape[-2:]) != tuple(size):
            psi = F.interpolate(psi[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
        return psi

    def class_scale(self, features: torch.Tensor) -> torch.Tensor:
        """``1 + psi_c`` on the feature grid: Eq. 4 folded into the CAM of Eq. 5."""
        return (1.0 + self.masks_at(features.shape[-2:]))[None]


@register_model(
    "dm",
    family="classifier",
    description="M1 disease-mask attention: f' = psi*f + f per class, CAM on f' (disease-masks Eq. 4-5)",
    default_kwargs={"backbone": "resnet50", "num_classes": NUM_CLASSES, "in_channels": 1,
                    "transition_channels": None, "mask_size": 16},
    test_kwargs={"backbone": "tiny", "mask_size": 8},
)
def dm(**kwargs: Any) -> DiseaseMaskClassifier:
    """Disease-mask attention classifier (disease-masks-attention.txt Eq. 4-5)."""
    return DiseaseMaskClassifier(**kwargs)
