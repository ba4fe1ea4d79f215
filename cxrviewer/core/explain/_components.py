"""Connected components and [0,1] rescaling shared by attention mining, boxes and masks."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

#: 8-connectivity in 2-D (skimage.measure.label's default for 2-D images)
EIGHT = np.ones((3, 3), dtype=bool)


def normalize01(a: np.ndarray, dtype: type | np.dtype = np.float64) -> np.ndarray:
    """Min-max rescale to [0, 1] in ``dtype`` (the box rules pass float32 to keep their maps
    float32); a constant map becomes all zeros."""
    a = np.asarray(a, dtype=dtype)
    lo, hi = float(np.min(a)), float(np.max(a))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 0.0:
        return np.zeros_like(a)
    return (a - a.dtype.type(lo)) / a.dtype.type(hi - lo)


def label_components(binary: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected components of a 2-D boolean array (0 = background)."""
    lab, n = ndimage.label(np.asarray(binary, dtype=bool), structure=EIGHT)
    return lab, int(n)
