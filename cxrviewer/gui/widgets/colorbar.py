"""A horizontal colour bar: the colour map with the raw values at its ends."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import QRect, QSize, Qt
from PySide6.QtGui import QColor, QImage, QPainter
from PySide6.QtWidgets import QSizePolicy, QWidget

from ...core.render import colormap


def _num(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


class ColorBar(QWidget):
    """Legend for the heat maps: ``label  low [gradient] high``."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.label, self.low, self.high, self.cmap = "", 0.0, 1.0, "jet"
        self._image: QImage | None = None
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.set_colormap("jet")

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt naming
        return QSize(320, 24)

    def set_colormap(self, name: str) -> None:
        self.cmap = name
        lut = np.ascontiguousarray(colormap(name)[None, :, :].repeat(2, 0))
        self._lut = lut  # keep the buffer alive for the QImage
        self._image = QImage(lut.data, 256, 2, 256 * 3, QImage.Format.Format_RGB888).copy()
        self.update()

    def set_scale(self, label: str, low: float, high: float, cmap: str | None = None) -> None:
        self.label, self.low, self.high = label, float(low), float(high)
        if cmap and cmap != self.cmap:
            self.set_colormap(cmap)
        self.setToolTip(f"{label}: {self.low:.4g} … {self.high:.4g} (raw values, {self.cmap})")
        self.update()

    @property
    def text(self) -> str:
        return f"{self.label} {_num(self.low)}…{_num(self.high)}"

    def paintEvent(self, _event) -> None:  # noqa: N802 - Qt naming
        p = QPainter(self)
        fm = p.fontMetrics()
        h = self.height()
        lab = f"{self.label}  " if self.label else ""
        lo, hi = _num(self.low), _num(self.high)
        x = 2
        p.setPen(self.palette().windowText().color())
        p.drawText(QRect(x, 0, fm.horizontalAdvance(lab + lo) + 4, h), Qt.AlignmentFlag.AlignVCenter, lab + lo)
        x += fm.horizontalAdvance(lab + lo) + 6
        w_hi = fm.horizontalAdvance(hi) + 6
        bar = QRect(x, 5, max(20, self.width() - x - w_hi - 2), h - 10)
        if self._image is not None:
            p.drawImage(bar, self._image)
        p.setPen(QColor(120, 120, 120))
        p.drawRect(bar)
        p.setPen(self.palette().windowText().color())
        p.drawText(QRect(bar.right() + 4, 0, w_hi, h), Qt.AlignmentFlag.AlignVCenter, hi)
        p.end()
