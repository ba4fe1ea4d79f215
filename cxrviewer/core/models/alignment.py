"""M4/M1 alignment module: affine regressor towards the canonical chest.

cia-net-alignment-contrast-attention.txt Eq. 1 and disease-masks-attention.txt
Eq. 6: a ResNet-18 (or any backbone) predicts ``(s_x, s_y, t_x, t_y, theta)``
and the image is resampled with

    A = [[s_x cos(theta), -s_y sin(theta), t_x],
         [s_x sin(theta),  s_y cos(theta), t_y]]

through ``F.affine_grid``/``F.grid_sample`` (``align_corners=False``).

How the five outputs map (``raw`` = the last linear layer's output):

* ``s_x = exp(raw[0])``, ``s_y = exp(raw[1])``: scales stay positive; raw 0 -> 1.
* ``t_x = raw[2]``, ``t_y = raw[3]``: shifts in normalised coordinates
  (the image spans [-1, 1]; ``t_x = 0.1`` is 5 % of the width).
* ``theta = raw[4]``: rotation in radians.

The last layer is initialised with zero weights and zero bias, so every image
starts at the identity ``(1, 1, 0, 0, 0)``. ``A`` maps output pixel coordinates
to input sampling coordinates (the ``affine_grid`` convention): ``s > 1`` zooms
out, positive ``t_x`` moves the content left. Maps computed on the aligned image
go back onto the original with ``warp(map, invert_affine(theta))``.
The training loss (Eq. 7-9 of disease-masks) compares the anchor with
:func:`grid_smooth` of the warped image, ``B(G(.))`` of Eq. 6.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrviewer.core.errors import ModelError
from cxrviewer.core.models.backbones import build_backbone
from cxrviewer.core.models.registry import register_model

PARAM_NAMES: tuple[str, ...] = ("s_x", "s_y", "t_x", "t_y", "theta")
IDENTITY_PARAMS: tuple[float, ...] = (1.0, 1.0, 0.0, 0.0, 0.0)


def affine_matrix(params: torch.Tensor) -> torch.Tensor:
    """``[B, 5]`` (s_x, s_y, t_x, t_y, theta) -> ``[B, 2, 3]`` (cia-net Eq. 1, disease-masks Eq. 6)."""
    if params.dim() != 2 or params.shape[1] != 5:
        raise ModelError(f"affine params must be [B, 5], got shape {tuple(params.shape)}")
    sx, sy, tx, ty, th = params.unbind(1)
    c, s = torch.cos(th), torch.sin(th)
    row0 = torch.stack([sx * c, -sy * s, tx], dim=1)
    row1 = torch.stack([sx * s, sy * c, ty], dim=1)
    return torch.stack([row0, row1], dim=1)


def params_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """Network output -> (s_x, s_y, t_x, t_y, theta): exp on the two scales."""
    return torch.cat([raw[:, :2].exp(), raw[:, 2:]], dim=1)


def raw_from_params(params: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`params_from_raw` (scales must be positive)."""
    return torch.cat([params[:, :2].log(), params[:, 2:]], dim=1)


def warp(img: torch.Tensor, theta: torch.Tensor, out_size: int | tuple[int, int] | None = None,
         mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Resample ``img [B, C, H, W]`` with affine ``theta [B, 2, 3]`` (``align_corners=False``)."""
    if img.dim() != 4:
        raise ModelError(f"warp expects [B, C, H, W], got shape {tuple(img.shape)}")
    if theta.dim() != 3 or theta.shape[1:] != (2, 3):
        raise ModelError(f"theta must be [B, 2, 3], got shape {tuple(theta.shape)}")
    if out_size is None:
        h, w = img.shape[-2:]
    elif isinstance(out_size, int):
        h = w = out_size
    else:
        h, w = out_size
    theta = theta.to(img.dtype)
    if theta.shape[0] != img.shape[0]:
        theta = theta.expand(img.shape[0], 2, 3)
    grid = F.affine_grid(theta, [img.shape[0], img.shape[1], int(h), int(w)], align_corners=False)
    return F.grid_sample(img, grid, mode=mode, padding_mode=padding_mode, align_corners=False)


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of ``[B, 2, 3]`` affines through the 3x3 homogeneous matrix."""
    if theta.dim() != 3 or theta.shape[1:] != (2, 3):
        raise ModelError(f"theta must be [B, 2, 3], got shape {tuple(theta.shape)}")
    bottom = theta.new_tensor([0.0, 0.0, 1.0]).expand(theta.shape[0], 1, 3)
    full = torch.cat([theta, bottom], dim=1)
    return torch.linalg.inv(full)[:, :2, :]


def grid_smooth(img: torch.Tensor, cell: int = 16) -> torch.Tensor:
    """``B(G(img))``: average pooling ``cell`` x ``cell`` (stride ``cell``), bilinear back (disease-masks Eq. 6)."""
    small = F.avg_pool2d(img, kernel_size=cell, stride=cell, ceil_mode=True)
    return F.interpolate(small, size=img.shape[-2:], mode="bilinear", align_corners=False)


class AlignmentNet(nn.Module):
    """Backbone -> GAP -> linear(5) regressor of the affine parameters, identity at init."""

    family = "alignment"

    def __init__(self, backbone: str = "resnet18", in_channels: int = 1,
                 regress_size: int | None = None, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.backbone = build_backbone(backbone, in_channels)
        self.fc = nn.Linear(self.backbone.out_channels, 5)
        nn.init.zeros_(self.fc.weight)
        with torch.no_grad():
            self.fc.bias.copy_(raw_from_params(torch.tensor([IDENTITY_PARAMS]))[0])
        self.regress_size = int(regress_size) if regress_size else None
        if padding_mode not in ("zeros", "border", "reflection"):
            raise ModelError(f"unknown padding_mode {padding_mode!r}")
        self.padding_mode = padding_mode

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"params" [B,5], "theta" [B,2,3], "aligned" [B,C,H,W]}``."""
        xr = x
        if self.regress_size is not None and tuple(x.shape[-2:]) != (self.regress_size,) * 2:
            xr = F.interpolate(x, size=(self.regress_size,) * 2, mode="bilinear",
                               align_corners=False, antialias=True)
        f = self.backbone(xr)["stage5"]
        params = params_from_raw(self.fc(f.mean((2, 3))))
        theta = affine_matrix(params)
        return {"params": params, "theta": theta,
                "aligned": warp(x, theta, padding_mode=self.padding_mode)}


@register_model(
    "alignment",
    family="alignment",
    description="Alignment module: ResNet-18 regressor of (s_x, s_y, t_x, t_y, theta), identity at init",
    default_kwargs={"backbone": "resnet18", "in_channels": 1, "regress_size": None,
                    "padding_mode": "zeros"},
    test_kwargs={"backbone": "tiny"},
)
def alignment(**kwargs: Any) -> AlignmentNet:
    """Alignment network (cia-net Eq. 1, disease-masks Eq. 6)."""
    return AlignmentNet(**kwargs)
