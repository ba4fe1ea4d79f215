"""Heat map -> boxes.

- :func:`heatmap_to_boxes`: normalise to [0, 1] (for extraction only), threshold, one box per
  8-connected component (ChestX-ray8 procedure as used in baseline-cam-space-attention-gated.txt
  Sec. 4.1: heat map scaled to [0, 255], threshold 180, i.e. 180/255 ~ 0.7 here).
- :func:`ranked_boxes`: iterative-attention-mining.txt Sec. 3.2 "Bbox Generation": three boxes per
  map at decreasing thresholds, ranked by the mean heat inside.
- :func:`grid_to_boxes`: CIA-Net's test procedure (cia-net-alignment-contrast-attention.txt
  Sec. 3.3): grid cells with probability above 0.5 are positive; components -> boxes.
- :func:`box_to_grid`: the grid labels of CIA-Net's box loss (Sec. 3.2: a cell is 1 when it
  overlaps the projected ground-truth box).

Boxes are :class:`cxrviewer.core.geometry.Box` in image pixels; the map is assumed to cover the
whole image (``image_size=(H, W)``; default: the map's own size). Scores are the mean of the map
(as given, raw values) over the box's cells. For boxes finer than a feature cell, resize the map
first (``cam.upsample_maps``), as ChestX-ray8 does before thresholding.

The pipeline extracts boxes from float32 maps with the longest side in
[:data:`BOX_MAP_MIN_SIDE`, :data:`BOX_MAP_SIDE`] (:func:`box_resolution`: a 512-px stored map is
bilinearly resampled to 128 px, a native grid is upsampled to 64 px), then scales the boxes to original
pixels: the 512-px labelling cost 16x the pixels for the same boxes (IoU numbers in
tests/core/test_explain_boxes.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from cxrviewer.core.explain._components import label_components, normalize01
from cxrviewer.core.geometry import Box

__all__ = [
    "CHESTXRAY8_THRESHOLD",
    "AM_THRESHOLDS",
    "BoxRule",
    "BOX_MAP_MIN_SIDE",
    "BOX_MAP_SIDE",
    "box_resolution",
    "box_to_grid",
    "grid_to_boxes",
    "heatmap_to_boxes",
    "ranked_boxes",
]

#: ChestX-ray8 / baseline-cam Sec. 4.1: threshold 180 on a [0, 255] heat map.
CHESTXRAY8_THRESHOLD = 180.0 / 255.0
#: Decreasing thresholds for the AM "three boxes" scheme (values not given in the paper).
AM_THRESHOLDS: tuple[float, ...] = (0.75, 0.5, 0.25)
#: longest side of the maps the pipeline extracts boxes from (larger maps are resampled to it)
BOX_MAP_SIDE = 128
#: maps smaller than this (native network grids) are upsampled to it first (ChestX-ray8 upsamples)
BOX_MAP_MIN_SIDE = 64


def _target_side(h: int, w: int, max_side: int, min_side: int) -> int | None:
    longest = max(h, w)
    if longest > max_side:
        return max_side
    if longest < min_side:
        return min_side
    return None


def box_resolution(maps: np.ndarray | torch.Tensor, *, max_side: int = BOX_MAP_SIDE,
                   min_side: int = BOX_MAP_MIN_SIDE, nearest: bool = False) -> np.ndarray:
    """Maps ``[..., h, w]`` as float32 with the longest side in ``[min_side, max_side]`` (aspect kept):
    bilinearly resampled to that range (``nearest``: nearest-neighbour both
    ways, for maps of probabilities per cell such as CIA-Net's grid), else unchanged. The boxes of
    the result, given ``image_size``, are in the same original pixels as those of ``maps``."""
    t = torch.as_tensor(maps).detach().to("cpu", torch.float32)
    h, w = int(t.shape[-2]), int(t.shape[-1])
    side = _target_side(h, w, max_side, min_side)
    if side is None:
        return t.numpy()
    s = side / max(h, w)
    size = (max(1, int(round(h * s))), max(1, int(round(w * s))))
    x = t.reshape(-1, 1, h, w)
    y = torch.nn.functional.interpolate(x, size=size, mode="nearest" if nearest else "bilinear",
                                        **({} if nearest else {"align_corners": False}))
    return y.reshape(*t.shape[:-2], *size).numpy()


def _as_2d(heat: np.ndarray | torch.Tensor) -> np.ndarray:
    a = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat)
    a = np.squeeze(a.astype(np.float32, copy=False))
    if a.ndim != 2:
        raise ValueError(f"a heat map must be 2-D, got shape {a.shape}")
    return a


def _component_boxes(
    raw: np.ndarray, binary: np.ndarray, label: str, image_size: tuple[int, int] | None, min_cells: int
) -> list[Box]:
    h, w = raw.shape
    ih, iw = image_size if image_size is not None else (h, w)
    sy, sx = ih / h, iw / w
    lab, n = label_components(binary)
    boxes = []
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None or int((lab[sl] == k).sum()) < min_cells:
            continue
        ys, xs = sl
        score = float(raw[sl].mean(dtype=np.float64))
        boxes.append(
            Box(label, xs.start * sx, ys.start * sy, (xs.stop - xs.start) * sx, (ys.stop - ys.start) * sy, score)
        )
    return boxes


def heatmap_to_boxes(
    heat: np.ndarray | torch.Tensor,
    threshold: float = CHESTXRAY8_THRESHOLD,
    *,
    label: str = "",
    image_size: tuple[int, int] | None = None,
    min_cells: int = 1,
) -> list[Box]:
    """Boxes of the connected components of ``N(heat) >= threshold``, best score first.

    ``heat`` ``[h, w]`` (raw values; rescaled to [0, 1] here only to threshold). Box coordinates
    are scaled from map cells to ``image_size = (H, W)``; score = mean raw heat inside the box.
    """
    raw = _as_2d(heat)
    boxes = _component_boxes(raw, normalize01(raw, raw.dtype) >= threshold, label, image_size, min_cells)
    return sorted(boxes, key=lambda b: -(b.score or 0.0))


def ranked_boxes(
    heat: np.ndarray | torch.Tensor,
    thresholds: Sequence[float] = AM_THRESHOLDS,
    *,
    n: int = 3,
    label: str = "",
    image_size: tuple[int, int] | None = None,
) -> list[Box]:
    """Up to ``n`` boxes from one map at decreasing thresholds, ranked by mean heat inside.

    iterative-attention-mining.txt Sec. 3.2. The paper does not say which box a threshold gives;
    our reading: at each threshold every connected component gives a box (the component holding
    the maximum grows as the threshold falls, separate findings give their own boxes); duplicates
    are dropped, all are ranked by mean heat and ``n`` kept (the paper: "H_f would just allow to
    generate fewer than 3 bboxes").
    """
    raw = _as_2d(heat)
    norm = normalize01(raw, raw.dtype)
    seen: set[tuple[float, float, float, float]] = set()
    cands: list[Box] = []
    for t in sorted(thresholds, reverse=True):
        for b in _component_boxes(raw, norm >= t, label, image_size, 1):
            key = (round(b.x, 6), round(b.y, 6), round(b.w, 6), round(b.h, 6))
            if key not in seen:
                seen.add(key)
                cands.append(b)
    cands.sort(key=lambda b: -(b.score or 0.0))
    return cands[:n]


def grid_to_boxes(
    grid_probs: np.ndarray | torch.Tensor,
    threshold: float = 0.5,
    *,
    label: str = "",
    image_size: tuple[int, int] | None = None,
) -> list[Box]:
    """CIA-Net grid ``[gh, gw]`` of probabilities -> boxes of the components of cells ``> threshold``.

    cia-net Sec. 3.3 (no normalisation: the grid already holds probabilities). Best score first.
    """
    raw = _as_2d(grid_probs)
    boxes = _component_boxes(raw, raw > threshold, label, image_size, 1)
    return sorted(boxes, key=lambda b: -(b.score or 0.0))


def box_to_grid(box: Box, image_size: tuple[int, int], grid: tuple[int, int] = (16, 16)) -> np.ndarray:
    """0/1 grid ``[gh, gw]``: cells that overlap ``box`` (positive area) projected onto the grid.

    CIA-Net box labels (cia-net Sec. 3.2, following Li et al.).
    """
    ih, iw = image_size
    gh, gw = grid
    ch, cw = ih / gh, iw / gw
    out = np.zeros((gh, gw), dtype=np.float32)
    x0, x1 = max(box.x, 0.0), min(box.x2, float(iw))
    y0, y1 = max(box.y, 0.0), min(box.y2, float(ih))
    if x1 <= x0 or y1 <= y0:
        return out
    c0, c1 = int(np.floor(x0 / cw)), int(np.ceil(x1 / cw))
    r0, r1 = int(np.floor(y0 / ch)), int(np.ceil(y1 / ch))
    out[r0:r1, c0:c1] = 1.0
    return out


@dataclass(frozen=True)
class BoxRule:
    """How an explainer turns one class's map into boxes: the one box-extraction path used by
    the app, ``cxrviewer analyze``, ``cxr-train evaluate`` and the benchmarks.

    ``kind``: ``threshold`` (:func:`heatmap_to_boxes`), ``ranked`` (:func:`ranked_boxes`) or
    ``grid`` (:func:`grid_to_boxes`); ``max_boxes`` keeps the best ones (None: all).
    """

    kind: str
    threshold: float | None = None
    max_boxes: int | None = None

    def __call__(self, heat: np.ndarray | torch.Tensor, *, label: str = "",
                 image_size: tuple[int, int] | None = None) -> list[Box]:
        if self.kind == "threshold":
            t = CHESTXRAY8_THRESHOLD if self.threshold is None else self.threshold
            boxes = heatmap_to_boxes(heat, t, label=label, image_size=image_size)
        elif self.kind == "ranked":
            boxes = ranked_boxes(heat, n=self.max_boxes or 3, label=label, image_size=image_size)
        elif self.kind == "grid":
            t = 0.5 if self.threshold is None else self.threshold
            boxes = grid_to_boxes(heat, t, label=label, image_size=image_size)
        else:
            raise ValueError(f"unknown box rule {self.kind!r}; rules are threshold, ranked, grid")
        return boxes if self.max_boxes is None else boxes[: self.max_boxes]
