"""Display data the viewer needs beside the results, built off the GUI thread (numpy only).

:func:`build_display` makes, once per results object, what the GUI thread would otherwise
compute while painting: the display pyramid of every panel's own base image (aligned image,
paired normal), the RGBA overlay of every mask panel and the region where aligned-frame maps
hold data. Only numpy arrays cross to the GUI thread.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrviewer.core.panels import panel_data, panel_list
from cxrviewer.core.render import segmentation_rgba
from cxrviewer.core.results import Results
from cxrviewer.core.study import Study

log = logging.getLogger(__name__)

__all__ = ["DisplayData", "build_display", "display_pyramid", "load_for_display"]


def display_pyramid(image: np.ndarray, levels: int = 3, min_side: int = 64) -> list[np.ndarray]:
    """``[image, /2, /4, ...]`` 2x2-mean levels (the viewer's display pyramid), float32."""
    out = [image]
    a = image
    for _ in range(levels):
        h, w = (a.shape[0] // 2) * 2, (a.shape[1] // 2) * 2
        if min(h, w) // 2 < min_side:
            break
        a = a[:h, :w].astype(np.float32, copy=False).reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        out.append(a)
    return out


@dataclass
class DisplayData:
    """Per panel key: the pyramid of its own image, the RGBA of its masks; and the valid region."""

    pyramids: dict[str, list[np.ndarray]] = field(default_factory=dict)
    overlays: dict[str, np.ndarray] = field(default_factory=dict)
    valid: np.ndarray | None = None  # bool map_shape: where aligned-frame maps land (None: everywhere)
    sources: dict[str, int] = field(default_factory=dict)  # panel key -> id of the array it was made from


def _valid_region(res: Results) -> np.ndarray | None:
    valid = res.get("alignment", "valid")
    if valid is not None:
        return np.asarray(valid, bool)
    affine = res.get("alignment", "affine")
    if affine is None:
        return None
    import torch  # results files written before "valid" was stored: compute it from the affine

    from cxrviewer.core.explain.alignment import valid_region
    from cxrviewer.core.models.alignment import invert_affine

    inv = invert_affine(torch.as_tensor(np.asarray(affine, np.float64)[None])).float()
    return valid_region(inv, tuple(res.map_shape))


def build_display(res: Results, previous: DisplayData | None = None) -> DisplayData:
    """Display data of ``res``, re-using what ``previous`` (the same study's) already holds."""
    prev = previous or DisplayData()
    out = DisplayData(valid=prev.valid)
    if out.valid is None:
        out.valid = _valid_region(res)
    for ref in panel_list():
        if ref.spec.per_class or ref.spec.kind == "heat":
            continue
        d = panel_data(ref.key, res, None)
        src = d.image if d.image is not None else d.masks
        if src is None:
            continue
        out.sources[ref.key] = id(src)
        same = prev.sources.get(ref.key) == id(src)
        if d.image is not None:
            out.pyramids[ref.key] = prev.pyramids[ref.key] if same else display_pyramid(d.image)
        else:
            out.overlays[ref.key] = prev.overlays[ref.key] if same else segmentation_rgba(d.masks)
    return out


def load_for_display(ref: Any, timeout: float = 30.0) -> Study:
    """The viewer's "load" job: decode a study and build its display pyramid off the GUI thread
    (shared by every panel)."""
    study = ref.load(timeout=timeout)
    try:
        study.display_pyramid = display_pyramid(study.modality)
    except (ValueError, MemoryError) as exc:  # a display nicety: never fail the load for it
        log.debug("no display pyramid: %s", exc)
    return study
