"""Space attention and attention-gated classifiers (baseline-cam-space-attention-gated.txt Sec. 3.2-3.3).

Space attention: the last feature map ``f`` is average-pooled to a context vector,
which is appended to every location (``[f; GAP(f)]``, 2K channels); one 1x1
convolution maps that to a C x h x w class map used for localisation, and its
average is the classification logit. The 1x1 conv is stored as the final linear
layer, so ``"features"`` is the concatenated map and ``cam_weights()`` is that
conv's ``(W [C, 2K], b)`` (a 1x1 conv keeps the CAM identity exact).

Attention-gated units (Schlemper et al., the paper's Eq. 2) after residual
blocks 2 and 3 (``stage3``/``stage4`` in the C2..C5 naming): for local features
``f_i`` and the global vector ``g = GAP(stage5)``,
``c_i = Psi relu(W_f f_i + W_g g + b_g) + b_psi``; ``a = softmax_i(c_i)`` over the
grid; the attended vector ``sum_i a_i f_i`` of each level is concatenated with
``g`` and fed to one linear classifier. ``"cam"`` is the CAM of the final
features (the ``g`` part of the linear layer, ``cam_weights()`` returns that
slice); the gate maps are returned as ``"attention_stage3"``/``"attention_stage4"``
(softmax, ``[B,1,h,w]``) and ``"compat_stage3"``/``"compat_stage4"`` (raw ``c``).
For this model ``logits = mean(cam) + b + (gated terms)``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from cxrviewer.core.classes import NUM_CLASSES
from cxrviewer.core.errors import ModelError
from cxrviewer.core.models.backbones import build_backbone
from cxrviewer.core.models.classifier import CamClassifier, _fit_masks
from cxrviewer.core.models.registry import register_model


class ContextConcat(nn.Module):
    """``[f; GAP(f)]``: global context appended to every location (space attention)."""

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        v = f.mean((2, 3), keepdim=True).expand_as(f)
        return torch.cat([f, v], dim=1)


class SpaceAttentionClassifier(CamClassifier):
    """Space attention network (baseline-cam-space-attention-gated.txt Sec. 3.2, Fig. 1)."""

    def __init__(self, backbone: str = "resnet34", num_classes: int = NUM_CLASSES,
                 in_channels: int = 1) -> None:
        super().__init__(backbone=backbone, num_classes=num_classes, in_channels=in_channels)
        self.context = ContextConcat()
        k = self.backbone.out_channels * 2
        self.feature_channels = k
        self.classifier = nn.Linear(k, self.num_classes)  # the "single convolution" (1x1)

    def extract(self, x: torch.Tensor, **extra: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        stages = self.backbone(x)
        return self.context(stages["stage5"]), dict(stages)

    def feature_layer(self) -> nn.Module:
        return self.context


class GridAttentionGate(nn.Module):
    """``c_i = Psi relu(W_f f_i + W_g g + b_g) + b_psi`` (baseline paper Eq. 2)."""

    def __init__(self, local_channels: int, global_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.w_f = nn.Conv2d(local_channels, inter_channels, kernel_size=1, bias=False)
        self.w_g = nn.Linear(global_channels, inter_channels)  # {W_g, b_g}: fully connected
        self.psi = nn.Conv2d(inter_channels, 1, kernel_size=1)  # {Psi, b_psi}: 1x1 conv

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attended vector ``[B, C_l]``, attention ``a`` and compatibility ``c`` (``[B,1,h,w]``)."""
        c = self.psi(torch.relu(self.w_f(f) + self.w_g(g)[:, :, None, None]))
        a = torch.softmax(c.flatten(2), dim=2).view_as(c)
        return (a * f).sum((2, 3)), a, c


class AttentionGatedClassifier(nn.Module):
    """ResNet with attention-gated units after blocks 2 and 3, scores concatenated (Sec. 3.3, Fig. 2)."""

    family = "classifier"
    LEVELS: tuple[str, ...] = ("stage3", "stage4")

    def __init__(self, backbone: str = "resnet34", num_classes: int = NUM_CLASSES,
                 in_channels: int = 1) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.backbone = build_backbone(backbone, in_channels)
        k = self.backbone.out_channels
        self.feature_channels = k
        self.gates = nn.ModuleDict({
            lvl: GridAttentionGate(self.backbone.channels[lvl], k, max(self.backbone.channels[lvl] // 2, 8))
            for lvl in self.LEVELS
        })
        total = k + sum(self.backbone.channels[lvl] for lvl in self.LEVELS)
        # columns: [g (K) | attended stage3 | attended stage4]
        self.classifier = nn.Linear(total, self.num_classes)

    def feature_layer(self) -> nn.Module:
        return self.backbone.stages["stage5"]

    def cam_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The slice of the linear layer acting on ``GAP(stage5)``, and its bias."""
        return self.classifier.weight[:, : self.feature_channels], self.classifier.bias

    def forward(self, x: torch.Tensor, feature_masks: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = dict(self.backbone(x))
        f = out["stage5"]
        g = f.mean((2, 3))
        w, b = self.classifier.weight, self.classifier.bias
        k = self.feature_channels
        cam = torch.einsum("ck,bkhw->bchw", w[:, :k], f)
        s = cam if feature_masks is None else cam * _fit_masks(feature_masks, cam)
        logits = s.mean((2, 3)) + b
        col = k
        for lvl in self.LEVELS:
            vec, a, c = self.gates[lvl](out[lvl], g)
            n = vec.shape[1]
            logits = logits + vec @ w[:, col:col + n].t()
            col += n
            out[f"attention_{lvl}"] = a
            out[f"compat_{lvl}"] = c
        if col != w.shape[1]:  # pragma: no cover - construction guarantees it
            raise ModelError("attention-gated classifier: linear layer width mismatch")
        out.update(logits=logits, features=f, cam=cam)
        return out


#: What both classifiers are built with by default, and as small test instances.
_DEFAULT_KWARGS: dict[str, Any] = {"backbone": "resnet34", "num_classes": NUM_CLASSES, "in_channels": 1}
_TEST_KWARGS: dict[str, Any] = {"backbone": "tiny"}


def _register_classifier(name: str,
                         description: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """:func:`register_model` for a classifier of this module (shared default and test kwargs)."""
    return register_model(name, family="classifier", description=description,
                          default_kwargs=_DEFAULT_KWARGS, test_kwargs=_TEST_KWARGS)


@_register_classifier("space_attention",
                      "Space attention: GAP context concatenated to every location, 1x1 conv class map")
def space_attention(**kwargs: Any) -> SpaceAttentionClassifier:
    """Space attention classifier (baseline-cam-space-attention-gated.txt Sec. 3.2)."""
    return SpaceAttentionClassifier(**kwargs)


@_register_classifier("attention_gated",
                      "Attention-gated units after residual blocks 2 and 3, scores concatenated")
def attention_gated(**kwargs: Any) -> AttentionGatedClassifier:
    """Attention-gated classifier (baseline-cam-space-attention-gated.txt Sec. 3.3, Eq. 2)."""
    return AttentionGatedClassifier(**kwargs)
