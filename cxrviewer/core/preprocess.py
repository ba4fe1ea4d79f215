"""Manifest-driven preprocessing: image in [0, 1] -> network input, and maps back.

Everything a network needs to see its input as during training comes from the
bundle manifest (:class:`cxrviewer.core.bundle.Manifest`), never from GUI code:

``crop``
    ``{"kind": "none"}`` or ``{"kind": "box", "box": [x0, y0, x1, y1]}`` with
    the corners as fractions of the image width/height (e.g. a lung crop).
``input_size``
    ``[H, W]``; the (cropped) image is resized to it, bilinear with
    anti-aliasing (aspect ratio is not kept, as in NIH/JSRT training).
``normalisation``
    ``{"kind": "minus1_1"}`` (``2x - 1``, the disease-masks recipe),
    ``{"kind": "zero_one"}`` or ``{"kind": "mean_std", "mean": m, "std": s}``.

:func:`maps_to_frame` is the inverse geometric step: a map over the network
input is resized back into the crop box of the image frame it came from.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CropBox = tuple[int, int, int, int]  # (y0, y1, x0, x1) in frame pixels


def crop_box_pixels(crop: Mapping[str, Any] | None, shape: tuple[int, int]) -> CropBox | None:
    """The manifest crop as ``(y0, y1, x0, x1)`` pixels of an image of ``shape``; None = whole."""
    if not crop or crop.get("kind", "none") == "none":
        return None
    box = crop.get("box")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"crop box must be [x0, y0, x1, y1] fractions, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    h, w = shape
    yy0, yy1 = int(round(max(0.0, y0) * h)), int(round(min(1.0, y1) * h))
    xx0, xx1 = int(round(max(0.0, x0) * w)), int(round(min(1.0, x1) * w))
    if yy1 - yy0 < 2 or xx1 - xx0 < 2:
        raise ValueError(f"crop box {box!r} is empty for an image of {shape}")
    if (yy0, yy1, xx0, xx1) == (0, h, 0, w):
        return None
    return (yy0, yy1, xx0, xx1)


def normalise(x01: torch.Tensor, norm: Mapping[str, Any] | None) -> torch.Tensor:
    """Map values in [0, 1] to the network's range (see module docstring)."""
    kind = (norm or {}).get("kind", "minus1_1")
    if kind == "minus1_1":
        return x01 * 2.0 - 1.0
    if kind == "zero_one":
        return x01
    if kind == "mean_std":
        mean = float(norm.get("mean", 0.5))  # type: ignore[union-attr]
        std = float(norm.get("std", 0.25))  # type: ignore[union-attr]
        return (x01 - mean) / max(std, 1e-8)
    raise ValueError(f"unknown normalisation kind {kind!r}")


def denormalise(x: torch.Tensor, norm: Mapping[str, Any] | None) -> torch.Tensor:
    """Inverse of :func:`normalise` (back to [0, 1])."""
    kind = (norm or {}).get("kind", "minus1_1")
    if kind == "minus1_1":
        return (x + 1.0) / 2.0
    if kind == "zero_one":
        return x
    if kind == "mean_std":
        return x * float(norm.get("std", 0.25)) + float(norm.get("mean", 0.5))  # type: ignore[union-attr]
    raise ValueError(f"unknown normalisation kind {kind!r}")


def as_image_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``[H, W]`` / ``[1, 1, H, W]`` array in [0, 1] -> float32 tensor ``[1, 1, H, W]``."""
    t = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    t = t.float()
    if t.dim() == 2:
        t = t[None, None]
    elif t.dim() == 3:
        t = t[None]
    if t.dim() != 4 or t.shape[1] != 1:
        raise ValueError(f"expected a grayscale image [H, W], got shape {tuple(t.shape)}")
    return t


def resize(t: torch.Tensor, size: tuple[int, int], *, mode: str = "bilinear") -> torch.Tensor:
    """Resize ``[B, C, H, W]`` to ``size``; anti-aliased when shrinking with bilinear."""
    size = (int(size[0]), int(size[1]))
    if tuple(t.shape[-2:]) == size:
        return t
    if mode == "nearest":
        return F.interpolate(t, size=size, mode="nearest")
    shrink = t.shape[-2] > size[0] or t.shape[-1] > size[1]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def percentile_stretch(x01: torch.Tensor, low: float = 1.0, high: float = 99.0) -> torch.Tensor:
    """Per-image contrast stretch of ``[B, 1, H, W]`` (or ``[H, W]``) values to [0, 1].

    ``(x - p_low) / (p_high - p_low)`` clipped, percentiles per image; an almost
    flat image is returned unchanged. Used by bundles trained on low-contrast data
    (the JSRT U-Net) whose manifest asks for it.
    """
    shape = x01.shape
    x = x01.reshape(-1, shape[-2] * shape[-1]) if x01.dim() >= 3 else x01.reshape(1, -1)
    q = torch.quantile(x.float(), torch.tensor([low / 100.0, high / 100.0], device=x.device), dim=1)
    lo, hi = q[0][:, None], q[1][:, None]
    span = hi - lo
    ok = span > 1e-3
    y = torch.where(ok, (x - lo) / span.clamp_min(1e-3), x).clamp(0.0, 1.0)
    return y.reshape(shape).to(x01.dtype)


def stretch_spec(manifest: Any) -> Mapping[str, Any] | None:
    """The contrast stretch a bundle expects before normalisation, or None.

    Read from ``normalisation.stretch`` or, for bundles that recorded it with their
    training recipe, ``provenance.preprocess`` (``{"kind": "percentile_stretch",
    "low": 1, "high": 99}``).
    """
    spec = (getattr(manifest, "normalisation", None) or {}).get("stretch")
    if spec is None:
        spec = (getattr(manifest, "provenance", None) or {}).get("preprocess")
    if isinstance(spec, Mapping) and spec.get("kind") == "percentile_stretch":
        return spec
    return None


def apply_stretch(t01: torch.Tensor, manifest: Any) -> torch.Tensor:
    """Apply the manifest's contrast stretch (if any) to an image in [0, 1]."""
    spec = stretch_spec(manifest)
    if spec is None:
        return t01
    return percentile_stretch(t01, float(spec.get("low", 1.0)), float(spec.get("high", 99.0)))


def prepare_input(image01: np.ndarray | torch.Tensor, manifest: Any,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, CropBox | None]:
    """Crop, resize and normalise an image in [0, 1] as the bundle ``manifest`` says.

    Returns ``(x [1, 1, H, W] on device, crop box in image pixels or None)``.
    """
    t = as_image_tensor(image01)
    box = crop_box_pixels(manifest.crop, (t.shape[-2], t.shape[-1]))
    if box is not None:
        y0, y1, x0, x1 = box
        t = t[..., y0:y1, x0:x1]
    t = apply_stretch(resize(t.to(device), tuple(manifest.input_size)), manifest)
    return normalise(t, manifest.normalisation), box


def maps_to_frame(maps: torch.Tensor, frame_shape: tuple[int, int], box: CropBox | None,
                  source_shape: tuple[int, int] | None = None, *, mode: str = "bilinear",
                  fill: float = 0.0) -> torch.Tensor:
    """Put maps ``[N, h, w]`` computed over a network input back onto an image frame.

    ``box`` is the crop (in pixels of an image of ``source_shape``, default
    ``frame_shape``) the input was cut from; outside it the result is ``fill``.
    Returns ``[N, *frame_shape]`` (raw values; bilinear or nearest).
    """
    if maps.dim() == 2:
        maps = maps[None]
    m = maps[None].float()  # [1, N, h, w]
    fh, fw = frame_shape
    if box is None:
        return resize(m, (fh, fw), mode=mode)[0]
    sh, sw = source_shape or frame_shape
    y0, y1, x0, x1 = box
    sy, sx = fh / sh, fw / sw
    fy0, fy1 = int(round(y0 * sy)), max(int(round(y1 * sy)), int(round(y0 * sy)) + 1)
    fx0, fx1 = int(round(x0 * sx)), max(int(round(x1 * sx)), int(round(x0 * sx)) + 1)
    out = m.new_full((1, m.shape[1], fh, fw), float(fill))
    out[..., fy0:fy1, fx0:fx1] = resize(m, (fy1 - fy0, fx1 - fx0), mode=mode)
    return out[0]
