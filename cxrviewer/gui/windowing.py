"""Window/level arithmetic for the viewer (pure numpy, no Qt).

Window/level is kept as ``(centre, width)`` in *modality* units (the values of
``Study.modality``, i.e. after the DICOM Modality LUT). pyqtgraph's
``ImageItem.setLevels`` takes ``(centre - width/2, centre + width/2)``.

Presets (keys 1-5)
------------------
Chest radiographs (CR/DX) are not calibrated like CT Hounsfield units, so the
lung / mediastinum / bone presets are defined as fractions of the image's
*robust data range* ``[p1, p99]`` (1st and 99th percentile of the modality
values), measured along a *density axis*: 0 = least attenuating (air,
displayed dark), 1 = most attenuating (bone/metal, displayed bright). For a
MONOCHROME1 study (``invert_display``) high stored values mean low density, so
the axis runs the other way in modality units. The fractions are heuristics
chosen by eye on NIH ChestX-ray14 PNGs (MONOCHROME2-like) and pydicom's
RG1_UNCR.dcm (CR, MONOCHROME1); change them in :data:`PRESETS`.

===  =========================  ==========================================
key  preset                     definition
===  =========================  ==========================================
1    Header default             the file's VOI window (``Study.window``)
2    Full range                 centre/width covering [min, max] exactly
3    Lung                       density centre 0.55, width 0.70 of range
4    Mediastinum / soft tissue  density centre 0.75, width 0.50 of range
5    Bone                       density centre 0.85, width 0.60 of range
===  =========================  ==========================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: a window is (centre, width) in modality units
Window = tuple[float, float]


@dataclass(frozen=True)
class WindowPreset:
    """A named window: fractions of the robust range along the density axis."""

    key: str
    name: str
    centre_frac: float | None = None  # None: special (header default / full range)
    width_frac: float | None = None


PRESETS: tuple[WindowPreset, ...] = (
    WindowPreset("1", "Header default"),
    WindowPreset("2", "Full range"),
    WindowPreset("3", "Lung", 0.55, 0.70),
    WindowPreset("4", "Mediastinum / soft tissue", 0.75, 0.50),
    WindowPreset("5", "Bone", 0.85, 0.60),
)


def describe(preset: WindowPreset) -> str:
    """One line for help texts and menus."""
    if preset.centre_frac is None or preset.width_frac is None:
        return "the file's VOI window" if preset.key == "1" else "exactly [min, max] of the image"
    return (f"density centre {preset.centre_frac:.0%}, width {preset.width_frac:.0%} "
            "of the 1-99 % range")


@dataclass(frozen=True)
class DataRange:
    """Full and robust value range of one image, in modality units."""

    vmin: float
    vmax: float
    p_lo: float  # 1st percentile
    p_hi: float  # 99th percentile

    @property
    def span(self) -> float:
        return max(self.vmax - self.vmin, 1e-6)


def data_range(modality: np.ndarray, max_samples: int = 262_144) -> DataRange:
    """Min/max and 1st/99th percentiles, from a strided subsample for speed."""
    arr = np.asarray(modality)
    if arr.size == 0:
        return DataRange(0.0, 1.0, 0.0, 1.0)
    step = max(1, int(math.sqrt(arr.size / max_samples)))
    sample = arr[::step, ::step] if arr.ndim == 2 else arr.ravel()[::step * step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return DataRange(0.0, 1.0, 0.0, 1.0)
    finite = arr[np.isfinite(arr)] if not np.isfinite(arr).all() else arr
    vmin, vmax = float(finite.min()), float(finite.max())
    p_lo, p_hi = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    if p_hi <= p_lo:
        p_lo, p_hi = vmin, vmax
    return DataRange(vmin, vmax, p_lo, p_hi)


def min_width(rng: DataRange) -> float:
    """Smallest window width allowed (keeps the mapping finite)."""
    return max(rng.span * 1e-4, 1e-6)


def preset_window(preset: WindowPreset, rng: DataRange, header: Window,
                  invert_display: bool) -> Window:
    """The ``(centre, width)`` a preset gives for one image (see module docstring)."""
    if preset.centre_frac is None or preset.width_frac is None:
        if preset.key == "1":
            return (float(header[0]), max(float(header[1]), min_width(rng)))
        return ((rng.vmin + rng.vmax) / 2.0, rng.span)
    robust = max(rng.p_hi - rng.p_lo, min_width(rng))
    if invert_display:  # MONOCHROME1: high values are low density
        centre = rng.p_hi - preset.centre_frac * robust
    else:
        centre = rng.p_lo + preset.centre_frac * robust
    return (float(centre), float(preset.width_frac * robust))


def drag_window(window: Window, dx: float, dy: float, rng: DataRange, *,
                display_inverted: bool = False, sensitivity: float = 0.005) -> Window:
    """New window after a W/L drag of ``(dx, dy)`` screen pixels.

    Horizontal: width is multiplied by ``exp(sensitivity * dx)`` (right = wider,
    less contrast). Vertical: the centre moves by ``sensitivity * width * dy``
    (both proportional to the current width); the sign is chosen so that
    dragging *down always darkens* the displayed image, inverted or not.
    """
    c, w = float(window[0]), float(window[1])
    w_new = max(w * math.exp(sensitivity * dx), min_width(rng))
    w_new = min(w_new, rng.span * 20.0)
    sign = -1.0 if display_inverted else 1.0
    c_new = c + sign * sensitivity * w * dy
    return (c_new, w_new)


def levels(window: Window) -> tuple[float, float]:
    """pyqtgraph levels ``(low, high)`` for a window."""
    c, w = window
    return (c - w / 2.0, c + w / 2.0)
