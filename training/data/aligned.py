"""Training images exactly as the app feeds them to the classifier, DM and CIA networks.

For each record the app's own alignment step runs
(:func:`cxrviewer.core.explain.alignment.align_for_models`: network, NCC refinement and check on
the canonical lung crop, composed onto the whole registered chest), on the working frame the
pipeline builds (longest side ``frame_max_side``, :func:`cxrviewer.core.explain.context.scaled_shape`);
the frame is warped by that affine, or left unaligned when the check rejects it (as the app
does), and resized to the cache size as ``Preprocess.crop_resize`` resizes it. Boxes follow the
warp: their corners go through the inverse affine, the result is their bounding box, clipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cxrviewer.core.geometry import Box

if TYPE_CHECKING:
    from cxrviewer.core.bundle import LoadedBundle

__all__ = ["AlignedImage", "FRAME_MAX_SIDE", "align_image", "boxes_through_affine", "load_alignment_bundle"]

#: The pipeline's default working-frame size (``Pipeline(frame_max_side=1024)``).
FRAME_MAX_SIDE = 1024
IDENTITY = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])


@dataclass
class AlignedImage:
    """One cached image: pixels in [0, 1] at the cache size, boxes in its pixels, the alignment used."""

    image: np.ndarray  # float32 [S, S]
    boxes: list[Box]
    theta: np.ndarray  # [2, 3] the affine applied (identity when rejected)
    quality: float  # NCC to the canonical chest (nan: not checked)
    rejected: bool


def load_alignment_bundle(bundle: "str | os.PathLike | LoadedBundle") -> "LoadedBundle":
    """A loaded alignment bundle on the CPU (a path is loaded)."""
    from cxrviewer.core.bundle import LoadedBundle, load_bundle

    if isinstance(bundle, LoadedBundle):
        return bundle
    b = load_bundle(Path(bundle), device="cpu")
    b.model.eval()
    return b


def boxes_through_affine(boxes: list[Box], theta: torch.Tensor | np.ndarray, src_shape: tuple[int, int],
                         size: int) -> list[Box]:
    """Boxes in ``src_shape`` pixels -> pixels of ``warp(image, theta)`` resized to ``size`` x ``size``.

    ``theta`` maps output normalised coordinates to input ones (``F.affine_grid``,
    ``align_corners=False``), so the four corners go through its inverse; a box becomes the
    bounding box of its mapped corners, clipped to the image; one left with no area is dropped.
    """
    from cxrviewer.core.models.alignment import invert_affine

    inv = invert_affine(torch.as_tensor(np.asarray(theta, np.float64)).reshape(1, 2, 3))[0].numpy()
    h, w = src_shape
    out: list[Box] = []
    for b in boxes:
        xs = np.array([b.x, b.x2, b.x2, b.x]) * 2.0 / w - 1.0
        ys = np.array([b.y, b.y, b.y2, b.y2]) * 2.0 / h - 1.0
        px = (inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2] + 1.0) * size / 2.0
        py = (inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2] + 1.0) * size / 2.0
        x0, x1 = float(np.clip(px.min(), 0, size)), float(np.clip(px.max(), 0, size))
        y0, y1 = float(np.clip(py.min(), 0, size)), float(np.clip(py.max(), 0, size))
        if x1 - x0 > 0 and y1 - y0 > 0:
            out.append(Box(b.label, x0, y0, x1 - x0, y1 - y0, b.score))
    return out


def align_image(image01: np.ndarray, boxes: list[Box], size: int, bundle: "LoadedBundle", *,
                frame_max_side: int = FRAME_MAX_SIDE, theta: Any = None,
                rejected: bool | None = None, quality: float = float("nan")) -> AlignedImage:
    """``image01 [H, W]`` in [0, 1] and its boxes as the app's classifier/DM/CIA input frame.

    Runs :func:`~cxrviewer.core.explain.alignment.align_for_models` on the pipeline's working
    frame unless a stored ``theta`` (with its ``rejected`` flag) is given (a second cache size).
    """
    from cxrviewer.core.explain.alignment import align_for_models
    from cxrviewer.core.explain.context import scaled_shape
    from cxrviewer.core.models.alignment import warp
    from cxrviewer.core.preprocess import as_image_tensor, resize

    shape = tuple(int(v) for v in image01.shape)
    frame = resize(as_image_tensor(image01).clamp(0, 1), scaled_shape(shape, frame_max_side))
    if theta is None:
        theta_t, check = align_for_models(frame, bundle)
        rejected = check.rejected
        quality = float("nan") if check.quality is None else float(check.quality)
    else:
        theta_t = torch.as_tensor(np.asarray(theta, np.float32)).reshape(1, 2, 3)
    if rejected:
        work, used = frame, IDENTITY
    else:
        with torch.no_grad():
            work, used = warp(frame, theta_t.float()).clamp(0, 1), theta_t.float()
    img = resize(work, (size, size))[0, 0].numpy().astype(np.float32)
    return AlignedImage(img, boxes_through_affine(boxes, used, shape, size), used[0].numpy().astype(np.float32),
                        quality, bool(rejected))
