"""The canonical chest (CIA-Net M4): ``resources/canonical_chest.png`` and its ``.json`` record.

Written by ``cxr-train canonical`` (training/commands/canonical.py); the alignment
trainer, the CIA trainer (``--negatives canonical``) and ``init-bundle`` read it here.

The canonical PNG is a lung crop (``crop_box`` of the ``.json``) of the registered full-frame
average. The alignment network and its NCC check work on that crop; the classifier, DM and CIA
networks see the *whole registered chest*: the registered full frame, widened by the ``.json``'s
``model_frame`` (:func:`model_frame_box`) so that long-field films keep their bases and heart in
view, through the affine of :func:`full_frame_theta` with :func:`crop_in_frame` (docs/field-of-view.md).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checksum import sha256_file


def default_canonical_path() -> Path:
    """``resources/canonical_chest.png`` of the checkout or the frozen app (may not exist)."""
    from .bundle import default_models_dir

    return default_models_dir().parent / "canonical_chest.png"


def canonical_ref(path: str | os.PathLike) -> dict[str, str]:
    """The manifest's ``canonical_chest`` reference to an image: file name + SHA-256."""
    return {"file": Path(path).name, "sha256": sha256_file(path)}


def load_canonical(path: str | os.PathLike | None = None, size: int | None = None, *,
                   antialias: bool = True) -> torch.Tensor:
    """The canonical chest as ``[1, 1, S, S]`` float32 in [0, 1].

    ``path`` defaults to :func:`default_canonical_path`; ``size`` None keeps the
    image's size, otherwise it is resized bilinearly, anti-aliased unless
    ``antialias=False`` (the CIA trainer's canonical negatives).
    """
    from PIL import Image

    with Image.open(path if path is not None else default_canonical_path()) as im:
        a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    t = torch.from_numpy(a)[None, None]
    if size is not None and tuple(t.shape[-2:]) != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    return t.clamp(0, 1)


#: The models' frame when the canonical record names none: the registered full frame itself.
FULL_FRAME: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


def model_frame_box(path: str | os.PathLike) -> tuple[float, float, float, float]:
    """The frame the classifier/DM/CIA networks see, ``(x0, y0, x1, y1)`` as fractions of the
    registered full frame (``model_frame`` of ``<name>.json``; may reach beyond 0..1), default :data:`FULL_FRAME`."""
    meta = Path(path).with_suffix(".json")
    if meta.is_file():
        box = json.loads(meta.read_text(encoding="utf-8")).get("model_frame")
        if box and len(box) == 4:
            return tuple(float(v) for v in box)  # type: ignore[return-value]
    return FULL_FRAME


def crop_in_frame(crop: Sequence[float], frame: Sequence[float]) -> tuple[float, float, float, float]:
    """The lung-crop box ``crop`` (fractions of the registered full frame) as fractions of ``frame``."""
    fx0, fy0, fx1, fy1 = (float(v) for v in frame)
    x0, y0, x1, y1 = (float(v) for v in crop)
    w, h = fx1 - fx0, fy1 - fy0
    return ((x0 - fx0) / w, (y0 - fy0) / h, (x1 - fx0) / w, (y1 - fy0) / h)


def canonical_crop_box(path: str | os.PathLike) -> tuple[float, float, float, float] | None:
    """The lung-crop box ``(x0, y0, x1, y1)`` recorded beside the canonical PNG (``<name>.json``), if any."""
    meta = Path(path).with_suffix(".json")
    if meta.is_file():
        box = json.loads(meta.read_text(encoding="utf-8")).get("crop_box")
        if box and len(box) == 4:
            return tuple(float(v) for v in box)
    return None


# ---- the models' frame: the whole registered chest --------------------------------------------
def crop_theta(box: Sequence[float]) -> torch.Tensor:
    """``[1, 2, 3]`` affine whose warp output is the box ``(x0, y0, x1, y1)`` (fractions) of the input.

    Per axis ``u_full = w * u_crop + (x0 + x1 - 1)``, ``w = x1 - x0`` (normalised coordinates,
    ``F.affine_grid`` convention): the canonical lung crop sampled from the registered full frame.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    return torch.tensor([[[x1 - x0, 0.0, x0 + x1 - 1.0], [0.0, y1 - y0, y0 + y1 - 1.0]]])


def full_to_crop_theta(box: Sequence[float]) -> torch.Tensor:
    """``[1, 2, 3]``: full-frame normalised coordinates -> lung-crop coordinates (inverse of :func:`crop_theta`).

    Per axis ``u_crop = u_full / w + (1 - x0 - x1) / w``, ``w = x1 - x0``.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    wx, wy = x1 - x0, y1 - y0
    return torch.tensor([[[1.0 / wx, 0.0, (1.0 - x0 - x1) / wx], [0.0, 1.0 / wy, (1.0 - y0 - y1) / wy]]],
                        dtype=torch.float64)


def full_frame_theta(theta_crop: torch.Tensor, box: Sequence[float] | None) -> torch.Tensor:
    """The affine onto the whole registered chest from one onto the canonical lung crop.

    ``theta_crop [B, 2, 3]`` (original -> lung-crop sampling, cia-net Eq. 1 as the alignment
    network and the NCC check use it) composed with :func:`full_to_crop_theta`:
    ``warp(I, theta_full) = warp(warp(I, theta_crop), full_to_crop)``, so the canonical crop is the
    ``box`` fraction of the returned frame. ``box`` None (no canonical chest record) returns
    ``theta_crop`` unchanged. Same dtype and device as ``theta_crop``.
    """
    if box is None:
        return theta_crop
    m = full_to_crop_theta(box).to(theta_crop.device)
    a = theta_crop.double()
    full = a[:, :, :2] @ m[:, :, :2]
    shift = a[:, :, :2] @ m[:, :, 2:] + a[:, :, 2:]
    return torch.cat([full, shift], dim=2).to(theta_crop.dtype)
