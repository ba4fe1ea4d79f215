"""Resizing and box-consistent augmentation (normalisation: :class:`cxrviewer.core.preprocess.Preprocess`).

Images are float32 [H, W] in [0, 1] (``Study.model_input``), boxes are
:class:`~cxrviewer.core.geometry.Box` in the pixels of the image they go with.
Every geometric change applied to an image is applied to its boxes: a box
becomes the axis-aligned bounds of its transformed corners, clipped to the
image; boxes that leave the image entirely are dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cxrviewer.core.geometry import Box


def resize_image_and_boxes(img: np.ndarray, boxes: list[Box], size: int) -> tuple[np.ndarray, list[Box]]:
    """Resize ``img`` to ``size`` x ``size`` (area-averaging when shrinking) and scale boxes."""
    h, w = img.shape
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    mode = "area" if (h > size and w > size) else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False}
    out = F.interpolate(t, size=(size, size), mode=mode, **kw)[0, 0].numpy()
    sx, sy = size / w, size / h
    return out, [b.scaled(sx, sy) for b in boxes]


@dataclass
class AugmentConfig:
    """Random augmentation ranges (all off when zero)."""

    rotation_deg: float = 5.0
    scale: float = 0.05  # +- fraction
    shift: float = 0.04  # +- fraction of the size
    brightness: float = 0.05
    contrast: float = 0.1
    gamma: float = 0.1


def affine_theta(rot_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    """2x3 matrix mapping OUTPUT normalised coords to INPUT coords (``F.affine_grid`` convention)
    for an image rotated by ``rot_deg``, scaled by ``scale`` and shifted by (tx, ty) in
    normalised units ([-1, 1] spans the image)."""
    a = math.radians(rot_deg)
    fwd = np.array([[scale * math.cos(a), -scale * math.sin(a), tx],
                    [scale * math.sin(a), scale * math.cos(a), ty],
                    [0.0, 0.0, 1.0]])
    return np.linalg.inv(fwd)[:2]


def affine_boxes(boxes: list[Box], w: int, h: int, rot_deg: float, scale: float,
                 tx: float, ty: float) -> list[Box]:
    """The boxes of a ``w`` x ``h`` image after :func:`apply_affine`: the bounds of each box's moved
    corners, clipped to the image; boxes that leave it (under a pixel wide or tall) are dropped."""
    a = math.radians(rot_deg)
    fwd = np.array([[scale * math.cos(a), -scale * math.sin(a), tx],
                    [scale * math.sin(a), scale * math.cos(a), ty]])
    new_boxes: list[Box] = []
    for b in boxes:
        xs = np.array([b.x, b.x2, b.x2, b.x])
        ys = np.array([b.y, b.y, b.y2, b.y2])
        # pixel -> normalised (align_corners=False): u = (2x + 1)/w - 1, edges at x=0 -> -1
        u = 2.0 * xs / w - 1.0
        v = 2.0 * ys / h - 1.0
        pu = fwd[0, 0] * u + fwd[0, 1] * v + fwd[0, 2]
        pv = fwd[1, 0] * u + fwd[1, 1] * v + fwd[1, 2]
        px = (pu + 1.0) * w / 2.0
        py = (pv + 1.0) * h / 2.0
        x0, x1 = float(np.clip(px.min(), 0, w)), float(np.clip(px.max(), 0, w))
        y0, y1 = float(np.clip(py.min(), 0, h)), float(np.clip(py.max(), 0, h))
        if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:
            new_boxes.append(Box(b.label, x0, y0, x1 - x0, y1 - y0, b.score))
    return new_boxes


def apply_affine(img: np.ndarray, boxes: list[Box], rot_deg: float, scale: float,
                 tx: float, ty: float) -> tuple[np.ndarray, list[Box]]:
    """Rotate/scale/shift a square-ish image about its centre; boxes follow."""
    h, w = img.shape
    theta = torch.tensor(affine_theta(rot_deg, scale, tx, ty), dtype=torch.float32)[None]
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()
    return out, affine_boxes(boxes, w, h, rot_deg, scale, tx, ty)


@dataclass(frozen=True)
class AugmentDraw:
    """One image's random augmentation (identity where a range is off)."""

    rot_deg: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # (tx, ty) in normalised units ([-1, 1] spans the image)
    gamma_power: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0

    def vector(self) -> np.ndarray:
        """float32 [9]: the image-sampling affine (2x3, ``F.affine_grid`` convention), gamma power,
        contrast, brightness: what :func:`augment_batch` needs (cheap to ship from a worker)."""
        theta = affine_theta(self.rot_deg, self.scale, *self.shift).astype(np.float32).ravel()
        return np.concatenate([theta, np.asarray([self.gamma_power, self.contrast, self.brightness],
                                                 np.float32)])


def draw_augment(rng: np.random.Generator, cfg: AugmentConfig) -> AugmentDraw:
    """The random numbers :func:`augment` uses, drawn in its order (rotation, scale, shift, gamma,
    contrast, brightness; a range that is off draws nothing)."""
    kw: dict = {}
    if geometric(cfg):
        kw["rot_deg"] = float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
        kw["scale"] = 1.0 + float(rng.uniform(-cfg.scale, cfg.scale))
        tx, ty = rng.uniform(-cfg.shift, cfg.shift, size=2) * 2.0
        kw["shift"] = (float(tx), float(ty))
    if cfg.gamma:
        kw["gamma_power"] = math.exp(rng.uniform(-cfg.gamma, cfg.gamma))
    if cfg.contrast or cfg.brightness:
        kw["contrast"] = 1.0 + float(rng.uniform(-cfg.contrast, cfg.contrast))
        kw["brightness"] = float(rng.uniform(-cfg.brightness, cfg.brightness))
    return AugmentDraw(**kw)


def geometric(cfg: AugmentConfig) -> bool:
    """Whether ``cfg`` moves pixels (rotation, scale or shift on)."""
    return bool(cfg.rotation_deg or cfg.scale or cfg.shift)


def augment(img: np.ndarray, boxes: list[Box], rng: np.random.Generator,
            cfg: AugmentConfig) -> tuple[np.ndarray, list[Box]]:
    """Random affine + intensity jitter; boxes stay consistent with the image."""
    d = draw_augment(rng, cfg)
    if geometric(cfg):
        img, boxes = apply_affine(img, boxes, d.rot_deg, d.scale, *d.shift)
    if cfg.gamma:
        img = np.clip(img, 0.0, 1.0) ** np.float32(d.gamma_power)
    if cfg.contrast or cfg.brightness:
        img = (img - np.float32(0.5)) * np.float32(d.contrast) + np.float32(0.5) + np.float32(d.brightness)
    return np.clip(img, 0.0, 1.0).astype(np.float32), boxes


def augment_batch(x01: torch.Tensor, aug: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """:func:`augment`'s image part on a batch ``x01`` [B, C, H, W] in [0, 1] (any device), with the
    per-image :meth:`AugmentDraw.vector` rows ``aug`` [B, 9]: one ``grid_sample`` for the batch."""
    aug = aug.to(device=x01.device, dtype=x01.dtype)
    if geometric(cfg):
        grid = F.affine_grid(aug[:, :6].reshape(-1, 2, 3), list(x01.shape), align_corners=False)
        x01 = F.grid_sample(x01, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cfg.gamma:
        x01 = x01.clamp(0.0, 1.0) ** aug[:, 6].view(-1, 1, 1, 1)
    if cfg.contrast or cfg.brightness:
        x01 = (x01 - 0.5) * aug[:, 7].view(-1, 1, 1, 1) + 0.5 + aug[:, 8].view(-1, 1, 1, 1)
    return x01.clamp(0.0, 1.0)
