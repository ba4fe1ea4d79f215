"""M0: baseline CAM classifier (baseline-cam-space-attention-gated.txt Sec. 3.1).

Backbone -> optional 1x1 "transition" conv -> global pooling -> linear -> C logits.
The class activation map is disease-masks-attention.txt Eq. 1,
``S_c = sum_k w_k^c f_k``, and with average pooling the logit is its mean plus the
bias (Eq. 2 up to the bias): ``logits[:, c] == cam[:, c].mean((1, 2)) + b[c]``.

Conventions shared by every classifier:

* ``"cam"`` holds raw maps **without** the bias: ``cam[:, c] = sum_k W[c, k] *
  features[:, k]`` (times ``1 + psi_c`` for DM models).
* ``cam_weights()`` returns ``(W [C, K], b [C])`` of the final linear layer.
* ``forward(x, feature_masks=None)``: optional per-class masks ``[B, C, h, w]`` on
  the feature map for attention mining (iterative-attention-mining.txt Eq. 1-2):
  ``logit_c = w_c . GAP(X * M^c) + b_c``, computed as ``mean(M^c * cam_c) + b_c``
  (no C copies of X). Needs average pooling.
* stage maps ``"stage2".."stage5"`` (C2..C5 naming, see backbones.py) are returned
  for knowledge preservation.
"""
from __future__ import annotations

from typing import Any

import math

import torch
import torch.nn.functional as F
from torch import nn

from cxrviewer.core.classes import NUM_CLASSES
from cxrviewer.core.errors import ModelError
from cxrviewer.core.models.backbones import build_backbone
from cxrviewer.core.models.registry import register_model

POOLS: tuple[str, ...] = ("avg", "max", "lse")


def global_pool(f: torch.Tensor, mode: str = "avg", lse_r: float = 10.0) -> torch.Tensor:
    """Global pooling ``[B, K, h, w] -> [B, K]``: average, max, or log-sum-exp.

    LSE: ``(1/r) log(mean exp(r f))``, between average (r -> 0) and max (r -> inf).
    """
    if mode == "avg":
        return f.mean((2, 3))
    if mode == "max":
        return f.amax((2, 3))
    if mode == "lse":
        n = f.shape[2] * f.shape[3]
        return (torch.logsumexp(lse_r * f.flatten(2), dim=2) - math.log(n)) / lse_r
    raise ModelError(f"unknown pooling {mode!r}; expected one of {POOLS}")


class CamClassifier(nn.Module):
    """Backbone + CAM head. Subclasses override :meth:`extract` (and :meth:`class_scale`)."""

    family = "classifier"

    def __init__(
        self,
        backbone: str = "resnet50",
        num_classes: int = NUM_CLASSES,
        in_channels: int = 1,
        transition_channels: int | None = None,
        pool: str = "avg",
        lse_r: float = 10.0,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ModelError(f"unknown pooling {pool!r}; expected one of {POOLS}")
        if int(num_classes) < 1:
            raise ModelError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.pool = pool
        self.lse_r = float(lse_r)
        self.backbone = build_backbone(backbone, in_channels)
        k = self.backbone.out_channels
        self.transition: nn.Module | None = None
        if transition_channels:
            self.transition = nn.Conv2d(k, int(transition_channels), kernel_size=1)
            k = int(transition_channels)
        self.feature_channels = k
        self.classifier = nn.Linear(k, self.num_classes)

    # -- pieces subclasses change ------------------------------------------------
    def extract(self, x: torch.Tensor, **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Feature map the CAM uses and the other outputs (stage maps, ...)."""
        stages = self.backbone(x)
        f = stages["stage5"]
        if self.transition is not None:
            f = self.transition(f)
        return f, dict(stages)

    def class_scale(self, features: torch.Tensor) -> torch.Tensor | None:
        """Per-class multiplicative map on the CAM (``1 + psi`` for DM), or None."""
        return None

    def feature_layer(self) -> nn.Module:
        """Module whose output is ``"features"`` (the Grad-CAM target layer)."""
        if self.transition is not None:
            return self.transition
        return self.backbone.stages["stage5"]

    def cam_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W [C, K], b [C])`` of the final linear layer (disease-masks Eq. 1 weights)."""
        return self.classifier.weight, self.classifier.bias

    # -- shared head ----------------------------------------------------------------
    def head(self, f: torch.Tensor, out: dict[str, torch.Tensor],
             feature_masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """CAM (disease-masks Eq. 1 / Eq. 5) and logits (Eq. 2, GAP of the CAM + bias)."""
        w, b = self.classifier.weight, self.classifier.bias
        cam = torch.einsum("ck,bkhw->bchw", w, f)
        scale = self.class_scale(f)
        if scale is not None:
            cam = cam * scale
        if self.pool == "avg":
            s = cam
            if feature_masks is not None:
                s = cam * _fit_masks(feature_masks, cam)
            logits = s.mean((2, 3)) + b
        else:
            if feature_masks is not None or scale is not None:
                raise ModelError("feature masks and disease masks need pool='avg'")
            logits = self.classifier(global_pool(f, self.pool, self.lse_r))
        out.update(logits=logits, features=f, cam=cam)
        return out

    def forward(self, x: torch.Tensor, feature_masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"logits" [B,C], "features" [B,K,h,w], "cam" [B,C,h,w], "stage2".."stage5"}``."""
        f, out = self.extract(x)
        return self.head(f, out, feature_masks)


def _fit_masks(masks: torch.Tensor, cam: torch.Tensor) -> torch.Tensor:
    """Per-class feature masks resized (nearest) to the CAM grid."""
    if masks.dim() != 4:
        raise ModelError(f"feature_masks must be [B, C, h, w], got shape {tuple(masks.shape)}")
    masks = masks.to(device=cam.device, dtype=cam.dtype)
    if masks.shape[-2:] != cam.shape[-2:]:
        masks = F.interpolate(masks, size=cam.shape[-2:], mode="nearest")
    return masks


@register_model(
    "cam_classifier",
    family="classifier",
    description="M0 baseline: backbone -> [1x1 transition] -> global pool -> linear, CAM (ChestX-ray8)",
    default_kwargs={"backbone": "resnet50", "num_classes": NUM_CLASSES, "in_channels": 1,
                    "transition_channels": None, "pool": "avg"},
    test_kwargs={"backbone": "tiny"},
)
def cam_classifier(**kwargs: Any) -> CamClassifier:
    """Baseline CAM classifier (baseline-cam-space-attention-gated.txt Sec. 3.1)."""
    return CamClassifier(**kwargs)
