"""Plain geometry shared by I/O, explanation, annotation and training code."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in original-image pixels: top-left ``(x, y)``, size ``(w, h)``.

    ``label`` is a canonical class name (see :mod:`cxrviewer.core.classes`);
    ``score`` is set for model proposals and ``None`` for ground truth.
    """

    label: str
    x: float
    y: float
    w: float
    h: float
    score: float | None = None

    @property
    def x2(self) -> float:
        return self.x + self.w

    @property
    def y2(self) -> float:
        return self.y + self.h

    @property
    def area(self) -> float:
        return max(self.w, 0.0) * max(self.h, 0.0)

    def scaled(self, sx: float, sy: float | None = None) -> "Box":
        """The same box with coordinates multiplied by ``sx`` (and ``sy``)."""
        sy = sx if sy is None else sy
        return Box(self.label, self.x * sx, self.y * sy, self.w * sx, self.h * sy, self.score)

    def as_xyxy(self) -> tuple[float, float, float, float]:
        return (self.x, self.y, self.x2, self.y2)
