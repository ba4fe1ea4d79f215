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


def apply_affine(img: np.ndarray, boxes: list[Box], rot_deg: float, scale: float,
                 tx: float, ty: float) -> tuple[np.ndarray, list[Box]]:
    """Rotate/scale/shift a square-ish image about its centre; boxes follow."""
    h, w = img.shape
    theta = torch.tensor(affine_theta(rot_deg, scale, tx, ty), dtype=torch.float32)[None]
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0].numpy()
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
    return out, new_boxes


def augment(img: np.ndarray, boxes: list[Box], rng: np.random.Generator,
            cfg: AugmentConfig) -> tuple[np.ndarray, list[Box]]:
    """Random affine + intensity jitter; boxes stay consistent with the image."""
    if cfg.rotation_deg or cfg.scale or cfg.shift:
        rot = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)
        sc = 1.0 + rng.uniform(-cfg.scale, cfg.scale)
        tx, ty = rng.uniform(-cfg.shift, cfg.shift, size=2) * 2.0
        img, boxes = apply_affine(img, boxes, rot, sc, tx, ty)
    if cfg.gamma:
        img = np.clip(img, 0.0, 1.0) ** math.exp(rng.uniform(-cfg.gamma, cfg.gamma))
    if cfg.contrast or cfg.brightness:
        c = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
        b = rng.uniform(-cfg.brightness, cfg.brightness)
        img = (img - 0.5) * c + 0.5 + b
    return np.clip(img, 0.0, 1.0).astype(np.float32), boxes
