"""Colour bars: the colour map with the quantity's name and the raw values at its ends.

:class:`ColorBarItem` is the one a panel carries (a pyqtgraph graphics widget in the panel's own
layout, under the image, so it is in every layout and in every grab of the panel).
"""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, QSizeF, Qt
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QImage, QPainter

from ...core.render import colormap, format_value


def lut_image(name: str) -> QImage:
    """A 256 x 1 RGB image of colour map ``name``."""
    lut = np.ascontiguousarray(colormap(name)[None, :, :])
    return QImage(lut.data, 256, 1, 256 * 3, QImage.Format.Format_RGB888).copy()


class ColorBarItem(pg.GraphicsWidget):
    """``label  low [gradient] high`` in one line under a panel's image; hidden without a map.

    ``label``, ``low``, ``high`` and ``cmap`` are exactly what the panel's map is drawn with
    (its quantity, its colour levels, its colour map).
    """

    HEIGHT = 16.0

    def __init__(self) -> None:
        super().__init__()
        self.label, self.low, self.high, self.cmap = "", 0.0, 1.0, ""
        self._image: QImage | None = None
        self._font = QFont()
        self._font.setPointSizeF(8.0)
        self.setMinimumWidth(0)
        self.set_shown(False)

    def sizeHint(self, which, constraint=QSizeF()) -> QSizeF:  # noqa: N802 - Qt naming
        """No width of its own (the panel's width), fixed height when shown."""
        h = self.HEIGHT if self.isVisible() else 0.0
        return QSizeF(1e6 if which == Qt.SizeHint.MaximumSize else 0.0, h)

    def set_shown(self, on: bool) -> None:
        """Show the bar (a map is drawn) or collapse it to zero height."""
        self.setVisible(on)
        h = self.HEIGHT if on else 0.0
        self.setMinimumHeight(h)
        self.setMaximumHeight(h)
        self.updateGeometry()

    def set_scale(self, label: str, low: float, high: float, cmap: str) -> None:
        """The quantity's name, the drawn levels and the colour map."""
        if cmap != self.cmap or self._image is None:
            self._image = lut_image(cmap)
        self.label, self.low, self.high, self.cmap = label, float(low), float(high), cmap
        self.setToolTip(f"{label}: colour {cmap} from {self.low:.4g} to {self.high:.4g} (raw values)")
        self.set_shown(True)
        self.update()

    @property
    def text(self) -> str:
        return f"{self.label} {format_value(self.low)}…{format_value(self.high)}"

    def paint(self, p: QPainter, *_args) -> None:
        if not self.isVisible() or self._image is None:
            return
        r = self.rect()
        fm = QFontMetricsF(self._font)
        p.setFont(self._font)
        p.setPen(QColor(230, 230, 230))
        lo, hi = format_value(self.low), format_value(self.high)
        w_lo, w_hi = fm.horizontalAdvance(lo) + 4, fm.horizontalAdvance(hi) + 4
        room = r.width() - w_lo - w_hi - 4
        w_bar = max(12.0, min(room * 0.3, 120.0))  # the name gets the most room
        w_lab = room - w_bar - 4
        lab = fm.elidedText(self.label, Qt.TextElideMode.ElideRight, w_lab) if w_lab > 20 else ""
        x = r.left() + 2
        if lab:
            p.drawText(QRectF(x, r.top(), w_lab, r.height()), Qt.AlignmentFlag.AlignVCenter, lab)
            x += w_lab + 4
        else:
            w_bar = max(12.0, room)
        p.drawText(QRectF(x, r.top(), w_lo, r.height()), Qt.AlignmentFlag.AlignVCenter, lo)
        x += w_lo
        bar = QRectF(x, r.top() + 3, w_bar, r.height() - 6)
        p.drawImage(bar, self._image)
        p.setPen(QColor(120, 120, 120))
        p.drawRect(bar)
        p.setPen(QColor(230, 230, 230))
        p.drawText(QRectF(bar.right() + 3, r.top(), w_hi, r.height()), Qt.AlignmentFlag.AlignVCenter, hi)
